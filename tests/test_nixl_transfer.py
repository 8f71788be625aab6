"""Real NIXL over UCX, two agents in one process: both initiator modes, 1 KiB .. 16 MiB, checksums;
a missing NIXL raises NixlUnavailable while the engine keeps working."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import struct
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from lifecycle import (CancelResult, IllegalTransition, InvalidArgument, NixlUnavailable, Outcome, PeerDisconnected,
                       Role, RoleRefused, State, TransferEngine, TransportError)
from lifecycle import _core
from lifecycle.transport import (ENV_CAPI, Faults, LoopbackTransport, Mem, NixlTransport, Offer, connect_all,
                                 nixl_capi_path, pool_slot)

from test_transport_harness import (HAVE_NIXL, KiB, SIZES, Side, build_shared, check_deregister_beside_a_live_session,
                                    connect, crc, loader_finds, needs_nixl, pattern, raw_metadata, run_child,
                                    wait_for)

pytestmark = pytest.mark.nixl


def test_missing_library_raises_nixl_unavailable_and_engine_keeps_working(tmp_path):
    e = TransferEngine(num_slots=1, slot_size=4096)
    missing = str(tmp_path / "libnixl_capi.so")
    with pytest.raises(NixlUnavailable, match=r"^NIXL C API unavailable: dlopen failed: .*pip install nixl-cu12==1\.5\.1") as ei:
        NixlTransport(e, "a", capi_path=missing)
    assert ei.value.library == missing and ei.value.missing_symbol == ""
    e.advertise(1, "sender", 10)
    assert e.cancel(1) is CancelResult.CancelledBeforeAdvertise
    assert e.state(1) is State.Quiesced


def test_incompatible_library_names_the_missing_symbol():
    import ctypes.util
    import glob

    libc = (glob.glob("/lib/x86_64-linux-gnu/libc.so.6") + glob.glob("/usr/lib*/libc.so.6"))[:1]
    assert libc, "no libc.so.6 found to stand in for an incompatible library"
    with pytest.raises(NixlUnavailable, match=r"symbol nixl_capi_\w+ missing; \d+ of \d+ required symbols") as ei:
        _core.load_nixl_capi(libc[0])
    assert ei.value.missing_symbol in _core.NIXL_CAPI_SYMBOLS


@pytest.mark.parametrize("what", ["fifo", "directory"])
def test_a_library_path_that_is_no_regular_file_is_refused_without_waiting(what, tmp_path):
    """$KV_LIFECYCLE_NIXL_CAPI (or capi_path) naming a FIFO: dlopen opens it to read and waits for a writer, so
    nixl_available() and NixlTransport() hung for good (the GIL released, the thread lost).  A path that names no
    regular file (after links) is refused first now: NixlUnavailable naming the path, and the library goes on
    working (a loopback transport).  A child runs it: the hang fails the test instead of stalling the run.
    (Seen failing before: the FIFO case hung; a directory was refused by dlopen, "cannot read file data".)"""
    target = tmp_path / "libnixl_capi.so"
    os.mkfifo(target) if what == "fifo" else target.mkdir()
    code = r'''
import os, sys
from lifecycle import NixlUnavailable, TransferEngine
from lifecycle.transport import LoopbackTransport, NixlTransport, nixl_available
os.environ["KV_LIFECYCLE_NIXL_CAPI"] = sys.argv[1]
assert not nixl_available()
try:
    NixlTransport(None, "no-file")
except NixlUnavailable as e:
    assert e.library == sys.argv[1] and e.missing_symbol == "", e
    print(e)
with LoopbackTransport(TransferEngine(num_slots=1, slot_size=4096), "still-works") as t:
    t.stats()
print("OK")
'''
    try:
        r = run_child(code, str(target), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a {what} as libnixl_capi.so hung")
    assert r.returncode == 0 and r.stdout.endswith("OK\n"), r.stdout + r.stderr
    assert re.match(rf"^NIXL C API unavailable: {re.escape(str(target))} is not a regular file", r.stdout), r.stdout


def test_env_var_overrides_the_wheel_path(monkeypatch, tmp_path):
    bogus = str(tmp_path / "nope.so")
    monkeypatch.setenv(ENV_CAPI, bogus)
    assert nixl_capi_path() == bogus
    with pytest.raises(NixlUnavailable, match=re.escape(bogus)):
        NixlTransport(None, "x")


@needs_nixl
@pytest.mark.parametrize("mode", ["read", "write"])
def test_a_buffer_beside_a_live_session_deregisters_and_one_it_covers_is_refused(mode):
    """NIXL over UCX: deregistering a buffer no session covers goes through while another request's passive
    session is live; the buffer that session offered is refused (NIXL's deregisterMem under the peer's
    transfer would free memory it still moves).  (Seen failing before: refused for any passive session.)"""
    a, b = Side(f"dr-a-{mode}", slots=2, slot_size=64 * KiB), Side(f"dr-b-{mode}", slots=2, slot_size=64 * KiB)
    try:
        check_deregister_beside_a_live_session(a, b, mode)
    finally:
        a.close()
        b.close()


@needs_nixl
@pytest.mark.parametrize("mode", ["read", "write"])
def test_two_agents_one_process_every_size_matches_checksum(mode):
    snd, rcv = Side("snd-" + mode), Side("rcv-" + mode)
    try:
        rcv_at_snd, snd_at_rcv = connect(snd, rcv)
        for i, n in enumerate(SIZES, start=1):
            src = snd.advertise(i, "sender", n, pattern(n, i))
            dst = rcv.advertise(i, "receiver", n, 0)
            if mode == "read":  # the receiver READs; the sender learns completion by notification
                offer = snd.t.expect(i, rcv_at_snd, src)
                rcv.t.read(i, dst, snd_at_rcv, offer)
            else:  # the sender WRITEs; the receiver learns completion by notification
                offer = rcv.t.expect(i, snd_at_rcv, dst)
                snd.t.write(i, src, rcv_at_snd, offer)
            assert snd.wait(i) is State.Quiesced and rcv.wait(i) is State.Quiesced
            assert snd.engine.outcome(i) is Outcome.completed and rcv.engine.outcome(i) is Outcome.completed
            assert crc(rcv.view(i, n)) == crc(pattern(n, i)), f"{mode} {n} B: checksum mismatch"
            snd.engine.terminate(i)
            rcv.engine.terminate(i)
        for s in (snd, rcv):
            s.engine.poll()
            st = s.t.stats()
            assert st.live_xfers == 0 and st.active == 0 and st.passive == 0, st
            assert s.engine.pool.stats()["free"] == 4
        active, passive = (rcv, snd) if mode == "read" else (snd, rcv)
        assert active.t.stats().completed == len(SIZES)
        assert passive.t.stats().done_received == len(SIZES)
    finally:
        snd.close()
        rcv.close()


@needs_nixl
def test_bad_descriptor_raises_before_expose_and_session_stays_advertised():
    a, b = Side("bad-a", slots=1, slot_size=4096), Side("bad-b", slots=1, slot_size=4096)
    try:
        b_at_a, _ = connect(a, b)
        m = a.advertise(1, "receiver", 4096)
        with pytest.raises(TransportError, match=r"create_xfer_req"):
            a.t.read(1, m, "no-such-peer", Offer(Mem(0x1000, 4096), 0))
        assert a.engine.state(1) is State.Advertised
        assert a.t.stats().live_xfers == 0
    finally:
        a.close()
        b.close()


@needs_nixl
def test_a_failed_post_leaves_the_peer_disconnected_until_remove_peer_and_add_peer():
    """Review (session 27), measured with NIXL 1.5.1: once one post to a peer fails (here a READ into a registered
    raw Mem whose pages were made inaccessible: UCX's cma copy fails, "Input/output error"), NIXL takes that peer
    for disconnected and every later post to it fails ("remote agent ... was disconnected after transfer request
    creation"), a good one too; add_peer() of its metadata alone does not help; remove_peer() then add_peer()
    does.  The error said only "post_xfer_req failed with status -2 (request N)": it named neither the peer nor
    the way back, and each later attempt Poisoned one slot on each side.  The error of a failed post names the
    peer and the remedy now (seen failing before: no peer, no remedy), and later transfers to that peer are
    refused before their expose until remove_peer().  Controls: the first transfer, and the one after
    remove_peer() + add_peer(), move their bytes."""
    snd, rcv = Side("pdis-snd", slots=4, slot_size=64 * KiB), Side("pdis-rcv", slots=4, slot_size=64 * KiB)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    n = 64 * KiB
    hint = r" to peer 'pdis-snd'; with NIXL 1\.5\.1 a failed post leaves the peer marked disconnected: every " \
           r"later transfer to it fails until remove_peer\(\) and add_peer\(\) of its metadata$"
    try:
        rcv_at_snd, snd_at_rcv = connect(snd, rcv)

        def read(req: int, dst: Mem | None = None) -> str:
            src = snd.advertise(req, "sender", n, pattern(n, req))
            if dst is None:
                dst = rcv.advertise(req, "receiver", n, 0)
            else:
                rcv.engine.advertise(req, "receiver", n)
            return rcv.t.read(req, dst, snd_at_rcv, snd.t.expect(req, rcv_at_snd, src))

        assert read(1) in ("Posted", "CompletedInPost") and rcv.wait(1) is State.Quiesced  # control
        assert crc(rcv.view(1, n)) == crc(pattern(n, 1))
        assert rcv.engine.health().healthy  # (control)
        snd.wait(1)
        snd.engine.terminate(1)
        rcv.engine.terminate(1)
        # Pages registered, then made inaccessible (PROT_NONE, never unmapped: the address stays reserved, and a
        # range a failed transfer leaves is never given back)
        p = libc.mmap(None, n, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
        assert p not in (None, ctypes.c_void_p(-1).value)
        rcv.t.register(Mem(p, n))
        assert libc.mprotect(p, n, 0) == 0
        with pytest.raises(TransportError, match=r"^NIXL call nixl_capi_post_xfer_req failed with status -?\d+ "
                                                 r"\(request 2\)" + hint):
            read(2, Mem(p, n))
        assert rcv.engine.state(2) is State.Poisoned  # posted, failed: no evidence
        # health says so while the mark stands (it said nothing: an executor polling health saw no reason)
        marked = "transport pdis-rcv: peer 'pdis-snd' disconnected after a failed post: remove_peer + add_peer"
        assert marked in rcv.engine.health().reasons and marked not in snd.engine.health().reasons
        # A good transfer to the same peer would fail too, after its expose (NIXL's mark): each Poisoned one slot on
        # each side.  It is refused before anything is built or exposed now (PeerDisconnected, naming the peer; seen
        # failing before: the post's error, the session Poisoned): the session stays Advertised and its cancel frees
        # at once.  So after add_peer() alone, which does not clear NIXL's mark.
        refused = (r"^transfer: request {}: transport pdis-rcv had a post to its peer fail: 'pdis-snd' \(NIXL 1\.5\.1 "
                   r"then takes it for disconnected: every later post to it fails\): refused before the expose; "
                   r"remove_peer\(\) and add_peer\(\) its metadata first$")
        for req in (3, 4):
            with pytest.raises(PeerDisconnected, match=refused.format(req)) as ei:
                read(req)
            assert ei.value.peer == snd_at_rcv and isinstance(ei.value, TransportError)
            assert rcv.engine.state(req) is State.Advertised
            assert rcv.engine.cancel(req) is CancelResult.CancelledBeforeAdvertise
            assert rcv.t.add_peer(snd.t.metadata()) == snd_at_rcv
        assert [r for r, _ in rcv.t.recent_failures()] == [2]  # the refusals were no backend failures
        assert rcv.t.stats().live_xfers == 0  # the refused requests' NIXL handles released
        # the way back: remove_peer(), then add_peer()
        assert marked in rcv.engine.health().reasons  # after add_peer() alone too
        rcv.t.remove_peer(snd_at_rcv)
        assert marked not in rcv.engine.health().reasons
        assert rcv.t.add_peer(snd.t.metadata()) == snd_at_rcv
        assert read(5) in ("Posted", "CompletedInPost") and rcv.wait(5) is State.Quiesced
        assert rcv.engine.outcome(5) is Outcome.completed and crc(rcv.view(5, n)) == crc(pattern(n, 5))
    finally:
        snd.close()
        rcv.close()


@needs_nixl
def test_a_restarted_peer_of_the_same_name_is_refused_by_add_peer_until_remove_peer():
    """Review (session 27), measured with NIXL 1.5.1: a peer restarted under its old name (a new agent) ships new
    metadata, and add_peer() of it, the old one still loaded, is refused by NIXL (NIXL_ERR_NOT_ALLOWED).  The
    error said "load_remote_md failed with status -2 (agent <our own name>)": neither the peer nor the way out.
    It names the peer and says to remove_peer() it first now (seen failing before: the bare status).  Controls:
    the same metadata loads again without complaint, and after remove_peer() the new agent's loads and moves
    bytes."""
    n = 4096
    a, b = Side("rst-a", slots=2, slot_size=n), Side("rst-b", slots=2, slot_size=n)
    b2 = None
    try:
        b_at_a, _ = connect(a, b)
        assert a.t.add_peer(b.t.metadata()) == b_at_a  # control: the same metadata again
        b.close()
        b2 = Side("rst-b", slots=2, slot_size=n)  # restarted: same name, a new agent
        with pytest.raises(TransportError, match=r"^NIXL call nixl_capi_load_remote_md failed with status -?\d+ "
                                                 r"\(agent rst-a; a peer named 'rst-b' is loaded already, with other "
                                                 r"metadata \(restarted\?\): remove_peer\(\) it first\)$") as ei:
            a.t.add_peer(b2.t.metadata())
        assert ei.value.call == "load_remote_md"
        a.t.remove_peer(b_at_a)
        assert a.t.add_peer(b2.t.metadata()) == "rst-b" and b2.t.add_peer(a.t.metadata()) == "rst-a"
        src = b2.advertise(1, "sender", n, pattern(n, 1))
        dst = a.advertise(1, "receiver", n, 0)
        assert a.t.read(1, dst, "rst-b", b2.t.expect(1, "rst-a", src)) in ("Posted", "CompletedInPost")
        assert a.wait(1) is State.Quiesced and a.engine.outcome(1) is Outcome.completed
        assert crc(a.view(1, n)) == crc(pattern(n, 1))
    finally:
        a.close()
        b.close()
        if b2 is not None:
            b2.close()


@needs_nixl
def test_read_after_cancel_before_expose_is_illegal_and_posts_nothing():
    a, b = Side("cbe-a", slots=1, slot_size=4096), Side("cbe-b", slots=1, slot_size=4096)
    try:
        b_at_a, a_at_b = connect(a, b)
        src = b.advertise(1, "sender", 4096, pattern(4096, 1))
        dst = a.advertise(1, "receiver", 4096, 0)
        assert a.engine.cancel(1) is CancelResult.CancelledBeforeAdvertise
        with pytest.raises(IllegalTransition, match=r"^can't handle event expose when state=Quiesced for request 1$"):
            a.t.read(1, dst, b_at_a, Offer(src, 0))
        assert a.t.stats().posted == 0 and a.t.stats().live_xfers == 0
    finally:
        a.close()
        b.close()


@needs_nixl
def test_torch_cpu_tensors_register_as_dram_and_transfer():
    import torch
    from lifecycle.transport import mem_of

    e1, e2 = TransferEngine(), TransferEngine()
    t1, t2 = NixlTransport(e1, "torch-a"), NixlTransport(e2, "torch-b")
    try:
        src = torch.arange(1 << 16, dtype=torch.float32)
        dst = torch.zeros(1 << 16, dtype=torch.float32)
        r1, r2 = t1.register(src), t2.register(dst)
        assert r1.mem.kind == "dram" and r1.mem.nbytes == src.numel() * 4
        p2 = t1.add_peer(t2.metadata())
        p1 = t2.add_peer(t1.metadata())
        e1.advertise(7, "sender")
        e2.advertise(7, "receiver")
        offer = t2.expect(7, p1, dst)  # a tensor: its memory
        t1.write(7, mem_of(src), p2, offer)
        assert e1.wait_terminal(7, 10) is State.Quiesced and e2.wait_terminal(7, 10) is State.Quiesced
        assert torch.equal(src, dst)
        t1.deregister(r1)
        assert t1.stats().registered_regions == 0
    finally:
        t1.stop()
        t2.stop()


class _CudaLike:
    """What mem_of reads of a CUDA tensor (data_ptr, device, layout), for a host without a GPU."""

    def __init__(self, ptr: int, numel: int, index: int | None):
        import torch

        self.device = torch.device("cuda", index) if index is not None else torch.device("cuda")
        self._ptr, self._numel = ptr, numel

    def data_ptr(self) -> int:
        return self._ptr

    def is_contiguous(self) -> bool:
        return True

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return 2


def test_cuda_tensors_map_to_vram_with_their_device_and_other_devices_are_refused():
    import torch
    from lifecycle.errors import InvalidArgument
    from lifecycle.transport import mem_of

    m = mem_of(_CudaLike(0x7F00_0000_1000, 3000, 3))
    assert (m.addr, m.nbytes, m.kind, m.device) == (0x7F00_0000_1000, 6000, "vram", 3)
    assert Mem.from_bytes(m.to_bytes()) == m  # the descriptor a peer gets names VRAM and the device
    assert mem_of(_CudaLike(0x1000, 1, None)).device == 0  # torch.device("cuda"): the current device, 0
    with pytest.raises(InvalidArgument, match=r"^invalid tensor: device meta is neither cpu nor cuda$"):
        mem_of(torch.empty(4, device="meta"))


@needs_nixl
def test_host_memory_registered_as_vram_is_a_typed_error_and_registers_nothing():
    """A CUDA-like tensor whose pointer is host memory: UCX detects host memory and NIXL refuses the
    VRAM registration (on this CPU host UCX has no CUDA at all). The refusal reaches Python as a
    TransportError naming the call (never a crash), and the agent keeps working for DRAM."""
    import ctypes

    buf = (ctypes.c_char * 4096)()
    with NixlTransport(None, "vram-refused") as t:
        # it also says what UCX lacks: seen on an H100, it was the CUDA 12 runtime (cuda12_runtime)
        with pytest.raises(TransportError, match=r"^NIXL call nixl_capi_register_mem failed with status -?\d+ "
                                                 r"\(agent vram-refused, 4096 bytes\): cannot register CUDA memory; "
                                                 r".*libcudart\.so\.12") as ei:
            t.register(_CudaLike(ctypes.addressof(buf), 2048, 0))
        assert ei.value.call == "register_mem" and ei.value.status < 0
        assert t.stats().registered_regions == 0
        t.register(Mem(ctypes.addressof(buf), 4096))  # DRAM still registers on the same agent
        assert t.stats().registered_regions == 1


@needs_nixl
@pytest.mark.parametrize("batch_calls", [False, True])
def test_paired_benchmark_loop_moves_the_bytes_and_pairs_every_batch(batch_calls):
    """benchmarks/bench_nixl.py's loop (_core._bench_paired): engine and bare transports alternate batch by
    batch; every transfer lands (the bytes arrive), the engine's sessions end Quiesced and terminated, and the
    two results hold one batch time per batch, pairwise.  Also with batch_calls (advertise_batch per batch,
    apply_batch of each drain's terminations), whose refused advertisements raise like the per-call ones."""
    import ctypes

    size, batch, count = 4096, 4, 12
    src = (ctypes.c_char * (batch * size))(*([b"\x5a"] * (batch * size)))
    dst = (ctypes.c_char * (batch * size))()
    src_mem, dst_mem = Mem(ctypes.addressof(src), len(src)), Mem(ctypes.addressof(dst), len(dst))
    engine = TransferEngine()
    with NixlTransport(engine, "pb-eng") as te, NixlTransport(None, "pb-bare") as tb, \
            NixlTransport(None, "pb-peer") as tp:
        te.register(src_mem)
        tb.register(src_mem)
        tp.register(dst_mem)
        connect_all(te, tb, tp)
        with pytest.raises(TypeError, match="another transport"):
            _core._bench_paired(te._core, te._core, "pb-peer", "write", src_mem.addr, dst_mem.addr, size, batch,
                                count, 1)
        # bounded before anything runs (2**40 was a bare bad_alloc; ids past 2**64 waited out a timeout)
        for n, b, first, arg in ((1 << 40, batch, 1, "count"), (count, 1 << 20, 1, "batch"),
                                 (count, batch, (1 << 64) - 5, "first_request")):
            with pytest.raises(InvalidArgument) as ei:
                _core._bench_paired(te._core, tb._core, "pb-peer", "write", src_mem.addr, dst_mem.addr, size, b, n,
                                    first)
            assert ei.value.argument == arg
        re_, rb = _core._bench_paired(te._core, tb._core, "pb-peer", "write", src_mem.addr, dst_mem.addr, size,
                                      batch, count, 1, batch_calls=batch_calls)
        engine.poll()
        # ids 1..count are tombstones now: advertising them again is refused, and the loop says which one
        with pytest.raises(TransportError, match="advertise refused for request 1$"):
            _core._bench_paired(te._core, tb._core, "pb-peer", "write", src_mem.addr, dst_mem.addr, size, batch,
                                count, 1, batch_calls=batch_calls)
    assert (re_["transfers"], rb["transfers"], re_["failed"], rb["failed"]) == (count, count, 0, 0)
    assert len(re_["batch_ns"]) == len(rb["batch_ns"]) == count // batch
    assert all(x > 0 for x in re_["batch_ns"] + rb["batch_ns"])
    assert len(re_["latency_ns"]) == count and rb["latency_ns"] == []
    assert bytes(dst) == bytes(src)
    assert engine.live_sessions() == 0  # every engine session terminated (ids 1..count)
    assert engine.state(1) is State.Terminated and engine.outcome(count) is Outcome.completed


@needs_nixl
def test_the_prepared_device_check_runs_on_cpu_and_can_fail():
    """scripts/device_check.py is the VRAM check for a machine with a GPU; CI runs its flow on CPU tensors
    so it stays working, and its negative control (one received byte changed) must make it fail."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"
    ok = subprocess.run([sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("13 of 13 cases passed"), ok.stdout + ok.stderr
    assert len(re.findall(r"^  cancel (active |passive) dram->dram (read |write) +16384 KiB: ok ", ok.stdout, re.M)) == 4
    # the active side's cancels land in flight (a delay fault holds its request) and take effect on its side
    assert re.search(r"^  cancel active +dram->dram read +16384 KiB: ok \(cancel -> CancelRequestedInFlight; "
                     r"states Quiesced/Quiesced; outcomes \w+/cancelled;", ok.stdout, re.M), ok.stdout
    assert re.search(r"^  cancel active +dram->dram write +16384 KiB: ok \(cancel -> CancelRequestedInFlight; "
                     r"states Quiesced/Quiesced; outcomes cancelled/\w+;", ok.stdout, re.M), ok.stdout
    landed = re.search(r"^  cancel pair: ok \((\d) of 4 cancels landed in flight; 0 transfer requests live", ok.stdout, re.M)
    assert landed and int(landed.group(1)) >= 2, ok.stdout
    bad = subprocess.run([sys.executable, str(script), "--device", "cpu", "--corrupt-one"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(r"dram->dram read +1 KiB: FAILED .*bytes DIFFER", bad.stdout), bad.stdout
    assert re.search(r"^12 of 13 cases passed; failed: dram->dram read +1 KiB$", bad.stdout, re.M), bad.stdout
    # the cancel cases' control: their agents drop every notification, so the evidence never comes
    drop = subprocess.run([sys.executable, str(script), "--device", "cpu", "--drop-notes"], capture_output=True,
                          text=True, timeout=120)
    assert drop.returncode == 1, drop.stdout + drop.stderr
    for who in ("active", "passive"):
        for mode in ("read", "write"):
            assert re.search(rf"^  cancel {who} +dram->dram {mode} +16384 KiB: FAILED .*Poisoned", drop.stdout, re.M), \
                drop.stdout
    assert re.search(r"^  cancel pair: FAILED .*may still be touched by the backend", drop.stdout, re.M), drop.stdout
    assert re.search(r"^8 of 13 cases passed; failed: ", drop.stdout, re.M), drop.stdout


def test_cuda12_runtime_loads_the_wheel_copy_so_that_a_library_needing_it_loads(tmp_path):
    """nixl-cu12's UCX needs libcudart.so.12 for its CUDA module (libucm_cuda), which a CUDA 13 image lacks
    (seen on an H100: VRAM registration failed until it was there).  cuda12_runtime() loads the copy in
    the nvidia-cuda-runtime-cu12 wheel.  Stand-ins here: a library with that soname in the wheel's place,
    and one that NEEDs it, as libucm_cuda does.  Control: before the call, the second one does not load."""
    if loader_finds("libcudart.so.12"):
        pytest.skip("this host's loader finds a libcudart.so.12: the stand-in would not be the one loaded")
    lib = tmp_path / "site" / "nvidia" / "cuda_runtime" / "lib"
    lib.mkdir(parents=True)
    for pkg in (lib.parent.parent, lib.parent):  # regular packages: ahead of any installed copy of the wheel
        (pkg / "__init__.py").write_text("")
    rt = build_shared(lib / "libcudart.so.12", "int cudaRuntimeGetVersion(int *v) { *v = 12090; return 0; }\n",
                      soname="libcudart.so.12")
    needs = build_shared(tmp_path / "needs.so", "int cudaRuntimeGetVersion(int *);\n"
                         "int probe(void) { int v = 0; cudaRuntimeGetVersion(&v); return v; }\n", needs=rt)
    out = run_child("""
        import ctypes
        sys.path.insert(0, sys.argv[1])
        try:
            ctypes.CDLL(sys.argv[2])
            print("before: loaded")
        except OSError as e:
            print("before:", e)
        from lifecycle.transport import cuda12_runtime
        print("runtime:", cuda12_runtime())
        print("probe:", ctypes.CDLL(sys.argv[2]).probe())
        print("again:", cuda12_runtime())
    """, str(tmp_path / "site"), str(needs))
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^before: libcudart\.so\.12: cannot open shared object file", out.stdout, re.M), out.stdout
    assert f"runtime: {rt}\n" in out.stdout, out.stdout
    assert "probe: 12090\n" in out.stdout and f"again: {rt}\n" in out.stdout, out.stdout


def test_cuda12_runtime_survives_a_mapped_file_whose_name_is_not_utf8(tmp_path):
    """/proc/self/maps lists every mapped file; one named in bytes that are not UTF-8 must not make the probe
    (and so every NixlTransport) raise.  Control: the same maps read as text raise UnicodeDecodeError."""
    out = run_child("""
        import mmap, os
        path = os.fsencode(sys.argv[1]) + b"/bad_\\xff.bin"
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
        f = open(path, "rb")
        m = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
        try:
            open("/proc/self/maps").read()
            print("text: read")
        except UnicodeDecodeError:
            print("text: UnicodeDecodeError")
        from lifecycle.transport import _mapped, cuda12_runtime
        print("runtime:", cuda12_runtime() is None or isinstance(cuda12_runtime(), str))
        print("bad:", _mapped("bad_") == os.fsdecode(path))
    """, str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "text: UnicodeDecodeError\n" in out.stdout, out.stdout  # the control: the case is really there
    assert "runtime: True\n" in out.stdout and "bad: True\n" in out.stdout, out.stdout


def _preparation_calls(monkeypatch) -> list[str]:
    """NixlTransport's preparations recorded in order ("cudart", "ucx"), then the core it makes ("core", which
    stops there); the library at a path is the wheel's iff the path is "wheel"."""
    import lifecycle.transport as tr

    calls = []

    class Core:
        @staticmethod
        def nixl(*args):
            calls.append("core")
            raise RuntimeError("stop here")

    monkeypatch.setattr(tr, "cuda12_runtime", lambda: calls.append("cudart"))
    monkeypatch.setattr(tr, "ucx_cuda_defaults", lambda: calls.append("ucx"))
    monkeypatch.setattr(tr._core, "_Transport", Core)
    monkeypatch.setattr(tr, "_is_wheel_capi", lambda path: path == "wheel")
    return calls


def test_nixl_transport_prepares_cuda_before_its_agent_starts_ucx(monkeypatch):
    """UCX loads its modules and reads its settings when the agent starts, so both preparations must run
    before the core is made, and the CUDA 12 runtime only for the wheel's NIXL."""
    calls = _preparation_calls(monkeypatch)
    for path, want in (("wheel", ["cudart", "ucx", "core"]), ("site-build", ["ucx", "core"])):
        calls.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            NixlTransport(None, "order", capi_path=path)
        assert calls == want, (path, calls)


def test_nixl_transport_prepares_cuda_for_the_library_it_loads(monkeypatch, tmp_path):
    """Found by review: $KV_LIFECYCLE_NIXL_CAPI overrode capi_path in the core (NixlCapi::load), but NixlTransport
    chose from capi_path whether the library is the wheel's: with the override naming the wheel's library and
    capi_path another, the wheel's NIXL started UCX without the CUDA 12 runtime prepared (['ucx', 'core']).
    Since session 29 an explicit capi_path wins over the variable (argument > environment > wheel), and the
    library the core loads is the one NixlTransport decides for: capi_path when given, else the variable's."""
    given = str(tmp_path / "given.so")
    monkeypatch.setenv(ENV_CAPI, str(tmp_path / "env" / "libnixl_capi.so"))
    with pytest.raises(NixlUnavailable) as ei:  # the core loads the path it was given, not the variable's
        _core.load_nixl_capi(given)
    assert ei.value.library == given

    calls = _preparation_calls(monkeypatch)
    cases = (("wheel", "site-build", ["ucx", "core"]), ("site-build", "wheel", ["cudart", "ucx", "core"]),
             ("wheel", None, ["cudart", "ucx", "core"]), ("site-build", None, ["ucx", "core"]),
             (None, "wheel", ["cudart", "ucx", "core"]), (None, "site-build", ["ucx", "core"]))
    for env, path, want in cases:
        if env is None:
            monkeypatch.delenv(ENV_CAPI, raising=False)
        else:
            monkeypatch.setenv(ENV_CAPI, env)
        calls.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            NixlTransport(None, "arg-wins", capi_path=path)
        assert calls == want, (env, path, calls)


def test_a_library_that_fails_to_load_is_named_with_where_its_path_came_from(monkeypatch, tmp_path):
    """Review (session 29): $KV_LIFECYCLE_NIXL_CAPI overrode an explicit capi_path, and the error of the library
    that then failed to load named the variable's path with nothing to say it came from there: a caller that
    passed capi_path read of a library it never asked for.  The path given wins now, and the error says where
    the path came from: the capi_path argument, the variable, or the installed nixl-cu12 wheel (a directory
    standing in for its library here)."""
    import lifecycle.transport as tr

    arg, env = tmp_path / "arg" / "libnixl_capi.so", tmp_path / "env" / "libnixl_capi.so"
    wheel = tmp_path / "wheel" / "libnixl_capi.so"
    wheel.mkdir(parents=True)
    monkeypatch.setenv(ENV_CAPI, str(env))
    with pytest.raises(NixlUnavailable) as ei:
        NixlTransport(None, "from-arg", capi_path=str(arg))
    assert ei.value.library == str(arg), ei.value
    assert f"library={arg} (from the capi_path argument)" in str(ei.value), ei.value
    assert f"or give the path of libnixl_capi.so (capi_path, or {ENV_CAPI} when none is given)" in str(ei.value)
    with pytest.raises(NixlUnavailable) as ei:
        NixlTransport(None, "from-env")
    assert ei.value.library == str(env), ei.value
    assert f"library={env} (from ${ENV_CAPI})" in str(ei.value), ei.value
    with pytest.raises(NixlUnavailable) as ei:  # the core given no path takes the variable's, and says so
        _core.load_nixl_capi("")
    assert ei.value.library == str(env) and f"(from ${ENV_CAPI})" in str(ei.value), ei.value
    monkeypatch.delenv(ENV_CAPI)
    monkeypatch.setattr(tr, "_wheel_capi", lambda spec: wheel)
    monkeypatch.setattr(tr.importlib.util, "find_spec", lambda name: type("Spec", (), {"origin": "x"})())
    with pytest.raises(NixlUnavailable) as ei:
        NixlTransport(None, "from-wheel")
    assert ei.value.library == str(wheel), ei.value
    assert f"library={wheel} (from the installed nixl-cu12 wheel)" in str(ei.value), ei.value


GETENV_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
/* getenv, interposed (LD_PRELOAD): counts the reads of each variable the core reads (GETENV_WATCHED, in that
   order) made with the calling thread holding the GIL and without it (PyGILState_Check: 0 inside the bindings'
   NoGil and on the core's own threads). */
static const char* const watched[] = {"KV_LIFECYCLE_NIXL_CAPI", "LIFECYCLE_CLOCK", "LIFECYCLE_LOOPBACK_COPY"};
int getenv_held[3] = {0}, getenv_unheld[3] = {0};
char* getenv(const char* name) {
  static char* (*real)(const char*) = 0;
  if (!real) real = (char* (*)(const char*))dlsym(RTLD_NEXT, "getenv");
  for (int i = 0; i < 3; ++i) {
    if (strcmp(name, watched[i]) == 0) {
      int (*check)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Check");
      __atomic_add_fetch(check && check() ? &getenv_held[i] : &getenv_unheld[i], 1, __ATOMIC_SEQ_CST);
    }
  }
  return real(name);
}
"""
GETENV_WATCHED = ("KV_LIFECYCLE_NIXL_CAPI", "LIFECYCLE_CLOCK", "LIFECYCLE_LOOPBACK_COPY")


@pytest.fixture(scope="module")
def getenv_shim(tmp_path_factory):
    """GETENV_SHIM built once for the module's tests (an LD_PRELOAD library)."""
    return build_shared(tmp_path_factory.mktemp("shim") / "libgetenv_shim.so", GETENV_SHIM)


def test_the_core_reads_the_library_variable_only_with_the_gil_held(tmp_path, getenv_shim):
    """Review (session 29): NixlCapi::load read $KV_LIFECYCLE_NIXL_CAPI with getenv inside the bindings'
    NoGil (load_nixl_capi, _Transport.nixl), for every load, a path given or not, while a Python thread may
    change os.environ (putenv / unsetenv, under the GIL): glibc's getenv beside a setenv is undefined
    behaviour.  The binding reads it with the GIL held now, only for an empty path, and the load under NoGil
    reads no environment.  A getenv stand-in counts the reads with the GIL held and without; the variable
    still names the library for an empty path (control: the held reads are seen, so the count is no vacuous
    zero)."""
    shim = getenv_shim
    child = """
        import ctypes, os, sys
        from lifecycle import NixlUnavailable, _core
        from lifecycle.transport import NixlTransport
        shim = ctypes.CDLL(sys.argv[1])
        held, unheld = (ctypes.c_int.in_dll(shim, n) for n in ("getenv_held", "getenv_unheld"))  # [0]: the path
        def named(call):
            try:
                call()
            except NixlUnavailable as e:
                return e.library, "from $KV_LIFECYCLE_NIXL_CAPI" in str(e)
            return None
        os.environ["KV_LIFECYCLE_NIXL_CAPI"] = sys.argv[2]
        print(named(lambda: _core.load_nixl_capi(b"")), named(lambda: _core.load_nixl_capi(b"/no/such/lib.so")),
              named(lambda: NixlTransport(None, "gil-env")),
              named(lambda: _core._Transport.nixl(None, "gil-env-core", b"", False, None, [], False, 0.001, False, "")))
        print(held.value, unheld.value)
    """
    src = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" + textwrap.dedent(child)
    env = dict(os.environ, LD_PRELOAD=str(shim))
    missing = str(tmp_path / "env" / "libnixl_capi.so")
    out = subprocess.run([sys.executable, "-c", src, str(shim), missing], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    named, counts = out.stdout.splitlines()[-2:]
    assert named == f"({missing!r}, True) ('/no/such/lib.so', False) ({missing!r}, True) ({missing!r}, True)", named
    held, unheld = map(int, counts.split())
    assert unheld == 0, f"{unheld} reads of the variable without the GIL ({held} with it)"
    assert held >= 2, f"the stand-in saw {held} reads with the GIL: the count cannot show anything"  # control


def test_the_clock_and_loopback_variables_are_read_only_with_the_gil_held(getenv_shim):
    """Review (session 29): $LIFECYCLE_CLOCK was read by the clock's first reading and $LIFECYCLE_LOOPBACK_COPY
    by the first loopback copy: wherever those fell, inside a binding's NoGil or on a transport's worker thread,
    while a Python thread may change os.environ (putenv / unsetenv, under the GIL): glibc's getenv beside a
    setenv is undefined behaviour.  The import reads the clock's variable now, and a LoopbackTransport's
    constructor (GIL held) the copy's; each still once per process.  The same getenv stand-in counts the reads
    through bench_native (an engine made inside NoGil: the clock's first reading) and a transfer on a loopback
    pair; the variables still take effect (the source says monotonic; the copy goes through a pipe, whose ends
    the worker keeps open, and through none without the variable).  Control: each variable's reads with the GIL
    are seen, so the zero without it is no vacuous one.  Seen failing before: 1 read of each without the GIL."""
    shim = getenv_shim
    child = """
        import ctypes, os
        from lifecycle import State, _core
        from test_transport_loopback import pair
        from test_transport_harness import pattern
        shim = ctypes.CDLL(sys.argv[1])
        held, unheld = ((ctypes.c_int * 3).in_dll(shim, n) for n in ("getenv_held", "getenv_unheld"))
        def pipes():
            links = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    links.append(os.readlink(f"/proc/self/fd/{fd}"))
                except FileNotFoundError:  # (listdir's own fd, closed)
                    pass
            return sum(link.startswith("pipe:") for link in links)
        before = pipes()
        _core.bench_native(1)  # the clock's first reading: an engine made inside NoGil
        a, b, (b_at_a, a_at_b) = pair(slots=1, slot_size=64 * 1024)
        try:
            dst = a.advertise(1, "receiver", 4096, 0)
            src = b.advertise(1, "sender", 4096, pattern(4096, 1))
            a.t.read(1, dst, b_at_a, b.t.expect(1, a_at_b, src))
            assert a.wait(1) is State.Quiesced and bytes(a.view(1, 4096)) == pattern(4096, 1)
            print(_core.steady_source(), pipes() - before)
        finally:
            a.close()
            b.close()
        print(*held, *unheld)
    """
    src = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" + textwrap.dedent(child)
    runs = {}
    for copy in ("pipe", ""):  # the pipe's ends are the core's only pipes: the control for that count
        env = dict(os.environ, LD_PRELOAD=str(shim), LIFECYCLE_CLOCK="monotonic", LIFECYCLE_LOOPBACK_COPY=copy)
        out = subprocess.run([sys.executable, "-c", src, str(shim)], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        effect, counts = out.stdout.splitlines()[-2:]
        counts = list(map(int, counts.split()))
        runs[copy] = effect.split(), dict(zip(GETENV_WATCHED[1:], zip(counts[1:3], counts[4:6])))
    (source, pipe_fds), _ = runs["pipe"]
    assert source == "monotonic" and int(pipe_fds) >= 2 and runs[""][0] == ["monotonic", "0"], runs
    for copy, (_, counts) in runs.items():
        for name, (held, unheld) in counts.items():
            assert unheld == 0, f"{unheld} reads of ${name} without the GIL ({held} with it; copy={copy!r})"
            if name == "LIFECYCLE_CLOCK" and platform.machine() != "x86_64":
                continue  # (the clock reads it only where it may use the TSC: x86-64)
            assert held >= 1, f"the stand-in saw no read of ${name} with the GIL: the count cannot show anything"


def test_ucx_cuda_defaults_apply_only_where_the_driver_loads_and_never_over_the_users_value(tmp_path):
    """UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y: without it, on one GPU, a READ of another process's VRAM was
    software-emulated and UCX aborted the owner when its peer died (H100, docs/transport.md).  Where
    the driver loads (stand-ins for libcuda.so.1 and libnvidia-ml.so.1 here), the default is set unless
    the user set the variable.  Where it does not (this host), nothing is set.  The control shows why that
    matters: set by hand on this host, UCX warns that the variable is unused."""
    if loader_finds("libcuda.so.1"):
        pytest.skip("this host has a CUDA driver: the no-driver branch cannot be shown here")
    cuda = build_shared(tmp_path / "libcuda.so.1", "int cuInit(unsigned f) { (void)f; return 0; }\n",
                        soname="libcuda.so.1")
    nvml = build_shared(tmp_path / "libnvidia-ml.so.1", "int nvmlInit_v2(void) { return 0; }\n",
                        soname="libnvidia-ml.so.1")
    probe = """
        import ctypes, os
        for lib in sys.argv[1].split(","):
            if lib:
                ctypes.CDLL(lib)  # loaded: CDLL(its soname) now finds it
        if sys.argv[2]:
            os.environ["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] = sys.argv[2]
        from lifecycle.transport import ucx_cuda_defaults
        print("applied:", ucx_cuda_defaults(), "now:", os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY"))
    """
    both = f"{cuda},{nvml}"
    driver = run_child(probe, both, "")
    assert "applied: {'UCX_CUDA_IPC_ENABLE_GET_ZCOPY': 'y'} now: y\n" in driver.stdout, driver.stdout + driver.stderr
    users = run_child(probe, both, "n")
    assert "applied: {} now: n\n" in users.stdout, users.stdout + users.stderr
    for libs in ("", str(cuda)):  # no driver; libcuda without NVML (UCX's CUDA transports need both)
        none = run_child(probe, libs, "")
        assert "applied: {} now: None\n" in none.stdout, (libs, none.stdout + none.stderr)
    if HAVE_NIXL:  # what the guard spares a CPU host: UCX's warning, on every agent
        agent = """
            import os
            if sys.argv[1]:
                os.environ["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] = sys.argv[1]
            from lifecycle import TransferEngine
            from lifecycle.transport import NixlTransport
            with NixlTransport(TransferEngine(), "ucx-defaults"):
                pass
            print("agent made")
        """
        quiet, loud = run_child(agent, ""), run_child(agent, "y")
        assert "agent made" in quiet.stdout and "agent made" in loud.stdout, quiet.stderr + loud.stderr
        assert "unused environment variable: UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in quiet.stdout + quiet.stderr
        assert "unused environment variable: UCX_CUDA_IPC_ENABLE_GET_ZCOPY" in loud.stdout + loud.stderr, loud.stderr


def test_every_session_has_its_own_serial_also_for_a_reused_id():
    e = TransferEngine(tombstones=0, shards=1)  # an id is free again as soon as it is terminated
    serials = set()
    for _ in range(3):
        e.advertise(1, "sender")
        serials.add(e.info(1).serial)
        e.cancel(1)
        e.terminate(1)
    assert len(serials) == 3 and 0 not in serials
    many = TransferEngine(shards=16)  # unique across the shards of one engine (not across engines)
    for req in range(1000):
        many.advertise(req, "receiver")
    assert len({many.info(req).serial for req in range(1000)} - {0}) == 1000


@needs_nixl
@pytest.mark.parametrize("mode", ["read", "write"])
def test_one_request_id_reused_round_after_round_over_nixl(mode):
    """An executor that reuses ids (no tombstones: the id is free again at once) with every "done" delivered
    twice: each round gets a new offer tag, completes with its own bytes, and no note of an earlier round
    reaches a later one (the engines count no illegal or late event)."""
    kw = dict(slots=1, slot_size=64 * 1024, tombstones=0, shards=1)
    faults = Faults(seed=61, duplicate_notification=1.0)
    snd = Side("reuse-snd-" + mode, transport_kw={"faults": faults if mode == "read" else None}, **kw)
    rcv = Side("reuse-rcv-" + mode, transport_kw={"faults": faults if mode == "write" else None}, **kw)
    try:
        rcv_at_snd, snd_at_rcv = connect(snd, rcv)
        tags = set()
        for rnd in range(40):
            n = 4096 + 64 * rnd
            src = snd.advertise(1, "sender", n, pattern(n, rnd))
            dst = rcv.advertise(1, "receiver", n, 0)
            if mode == "read":
                offer = snd.t.expect(1, rcv_at_snd, src)
                rcv.t.read(1, dst, snd_at_rcv, offer)
            else:
                offer = rcv.t.expect(1, snd_at_rcv, dst)
                snd.t.write(1, src, rcv_at_snd, offer)
            tags.add(offer.tag)
            assert snd.wait(1) is State.Quiesced and rcv.wait(1) is State.Quiesced, rnd
            assert snd.engine.outcome(1) is Outcome.completed and rcv.engine.outcome(1) is Outcome.completed, rnd
            assert crc(rcv.view(1, n)) == crc(pattern(n, rnd)), rnd
            snd.engine.terminate(1)
            rcv.engine.terminate(1)
        assert len(tags) == 40
        passive = snd if mode == "read" else rcv
        # the copy of the last "done" is handed over right after the original: the wait above can return
        # between the two, so the count is awaited (bounded) before it is pinned
        wait_for(lambda: passive.t.stats().done_received >= 80, 10, "the last round's duplicated done")
        assert passive.t.fault_stats()["duplicated"] == 40 and passive.t.stats().done_received == 80
        for s in (snd, rcv):
            st = s.engine.statistics()
            assert st.illegal == 0 and st.late == 0, (s.name, st)
    finally:
        snd.close()
        rcv.close()


@needs_nixl
def test_one_changed_byte_of_the_ucx_address_is_refused_before_ucx_sees_it():
    """Session 17's fuzzing: one changed byte in the UCX worker address inside a peer's metadata made UCX
    abort the process (an assertion on the address version, inside NIXL's load).  The envelope's checksum
    refuses it now (the envelope's own cases, for both transports: test_transport_loopback.py).  Negative
    control, in a child: the same changed byte without the envelope (raw metadata, as an agent outside this
    library ships it, goes to NIXL as it is) kills the process.  Control: the untouched metadata loads."""
    a, b = NixlTransport(None, "md-crc-a"), NixlTransport(None, "md-crc-b")
    try:
        b.register(bytearray(8192))
        md = b.metadata()
        ucx = md.index(b"UCX|c") + 5 + 8  # the first byte of UCX's packed worker address
        with pytest.raises(InvalidArgument, match=r"^invalid metadata: checksum mismatch: "):
            a.add_peer(md[:ucx] + bytes([md[ucx] ^ 0xFF]) + md[ucx + 1:])
        assert a.add_peer(md) == "md-crc-b"  # the control
    finally:
        a.stop()
        b.stop()
    child = run_child("""
        from lifecycle.transport import NixlTransport
        from test_transport_harness import raw_metadata
        a, b = NixlTransport(None, "md-raw-a"), NixlTransport(None, "md-raw-b")
        b.register(bytearray(8192))
        raw = bytearray(raw_metadata(b))
        raw[raw.index(b"UCX|c") + 5 + 8] ^= 0xFF
        try:
            a.add_peer(bytes(raw))
            print("loaded")
        except Exception as e:
            print("refused:", type(e).__name__, e)
    """, timeout=60)
    assert child.returncode < 0, ("the control: without the envelope the changed byte no longer kills the process "
                                  "(a UCX without that assertion?), so this test shows nothing",
                                  child.returncode, child.stdout, child.stderr[-2000:])


@needs_nixl
def test_cut_raw_metadata_is_refused_and_leaves_nothing_loaded():
    """Review (session 28), measured with NIXL 1.5.1: raw metadata (no envelope, as an agent outside this library
    ships it) cut anywhere past the peer's connection info (its memory sections) failed NIXL's load after NIXL had
    loaded that connection; the failed load kept it and invalidate_remote_md then found nothing, so the peer's
    whole metadata was refused for good (load_remote_md -1), remove_peer() or not (seen failing before: from
    byte 306 of 454 on).  Every cut is refused before NIXL sees it now: InvalidArgument naming the metadata.
    Controls: the whole raw metadata loads after all of them and moves bytes; raw metadata with a record of
    another layout appended is not judged here (NIXL 1.5.1 loads it)."""
    snd, rcv = Side("md-cut-snd", slots=1, slot_size=4096), Side("md-cut-rcv", slots=1, slot_size=4096)
    try:
        raw = raw_metadata(snd.t)
        for cut in range(1, len(raw)):
            with pytest.raises(InvalidArgument, match=r"^invalid metadata: it ends inside a record NIXL's layout still "
                                                      rf"expects \({cut} bytes: cut on the way\?\): refused, nothing "
                                                      r"loaded into agent md-cut-rcv"):
                rcv.t.add_peer(raw[:cut])
        other = raw + b"Zz" + (0).to_bytes(8, "little") + b"|"
        assert rcv.t.add_peer(other) == "md-cut-snd"  # (the control: another layout goes to NIXL)
        rcv.t.remove_peer("md-cut-snd")
        assert rcv.t.add_peer(raw) == "md-cut-snd"
        assert snd.t.add_peer(rcv.t.metadata()) == "md-cut-rcv"
        src = snd.advertise(1, "sender", 4096, pattern(4096, 1))
        dst = rcv.advertise(1, "receiver", 4096, 0)
        rcv.t.read(1, dst, "md-cut-snd", snd.t.expect(1, "md-cut-rcv", src))
        assert rcv.wait(1) is State.Quiesced and rcv.engine.outcome(1) is Outcome.completed
        assert crc(rcv.view(1, 4096)) == crc(pattern(4096, 1))
    finally:
        snd.close()
        rcv.close()


@needs_nixl
def test_raw_metadata_of_another_layout_is_not_taken_for_cut():
    """Review (session 28): the layout walk read the untagged MemSection record's first 8 bytes as its length, so a
    layout with a tagged record in its place (a short tag gives a plausible length) was judged cut and refused with
    "cut on the way", though NIXL might load it: a peer that could never connect.  MemSection is matched whole now,
    and a length past 4 GiB is another layout, not a cut.  Each crafted metadata (a record inserted before
    MemSection, with a 1-byte and a 4-byte tag) goes to NIXL, whose answer is not this refusal (seen failing
    before: refused as cut).  Control: the same metadata cut inside MemSection is still refused as cut."""
    snd = Side("md-other-snd", slots=1, slot_size=4096)
    try:
        raw = raw_metadata(snd.t)
        at = raw.index(b"\x0a" + bytes(7) + b"MemSection|")
        cut_msg = r"ends inside a record NIXL's layout still expects"
        rcv0 = Side("md-other-rcv0", slots=1, slot_size=4096)
        try:
            with pytest.raises(InvalidArgument, match=cut_msg):  # (the control)
                rcv0.t.add_peer(raw[:at + 12])
        finally:
            rcv0.close()
        for tag in (b"s", b"Xtra"):
            crafted = raw[:at] + tag + (4).to_bytes(8, "little") + b"abcd|" + raw[at:]
            rcv = Side(f"md-other-rcv-{tag.decode()}", slots=1, slot_size=4096)
            try:
                try:
                    rcv.t.add_peer(crafted)
                except Exception as exc:  # NIXL's own answer (it does not know this layout): anything but the cut
                    assert not re.search(cut_msg, str(exc)), (tag, exc)
            finally:
                rcv.close()
    finally:
        snd.close()


@needs_nixl
def test_a_peer_name_that_is_not_utf8_is_refused_with_a_typed_error():
    """Metadata whose agent name is not UTF-8 loaded, and the name's way back to Python raised a bare
    UnicodeDecodeError -- with the peer loaded and unnameable.  add_peer now refuses it: InvalidArgument
    naming the metadata and showing the name escaped, and the peer is unloaded again.  Each case is the
    metadata of a real agent with its name's last three bytes replaced in place (same length).  Control: the
    untouched metadata loads and names the agent.  Metadata that is not bytes is refused too (an int made
    bytes(n), n zero bytes)."""
    good = "kvlc-utf8-XYZ"
    a = NixlTransport(TransferEngine(num_slots=1, slot_size=4096), "kvlc-utf8-loader")
    b = NixlTransport(TransferEngine(num_slots=1, slot_size=4096), good)
    try:
        a.register(a.engine.pool)
        b.register(b.engine.pool)
        md = raw_metadata(b)  # (crafted bytes in the envelope fail its checksum first)
        assert md.count(good.encode()) == 1
        for bad in (b"\xff\xfe!", b"\xed\xa0\x80", b"\xc0\x80!", b"Y\xe2\x82"):
            crafted = md.replace(good.encode(), good.encode()[:-3] + bad)
            with pytest.raises(InvalidArgument, match=r"^invalid metadata: the peer's agent name 'kvlc-utf8-.*\\x"
                                                      r"[0-9a-f]{2}.*' is empty, not UTF-8, or holds a NUL byte"):
                a.add_peer(crafted)
        for bad in (12345, "text", None):
            with pytest.raises(InvalidArgument, match=r"^invalid metadata: expected the peer's metadata as bytes"):
                a.add_peer(bad)
        assert a.add_peer(md) == good  # the control
    finally:
        a.stop()
        b.stop()


@needs_nixl
def test_metadata_whose_agent_name_holds_a_nul_is_refused_and_loads_nothing():
    """NIXL's C API hands the loaded peer's name back as a C string: a name holding a NUL came back cut
    ("n" for "n\\0-b"), the peer then known under a name not its own, and NIXL kept the whole one loaded,
    where remove_peer() could never reach it (a review finding).  It is refused before anything is loaded.
    Controls: the same metadata with a same-length name without the NUL loads under that full name, and
    the original loads."""
    a, b = NixlTransport(None, "nx-nul-a"), NixlTransport(None, "nx-nul-b")
    try:
        b.register(bytearray(4096))
        md = raw_metadata(b)  # (crafted bytes in the envelope fail its checksum first)
        assert md.count(b"nx-nul-b") == 1
        with pytest.raises(InvalidArgument, match=r"^invalid metadata: the peer agent's name in it holds a NUL byte "
                                                  r"\(NIXL would cut it there\): refused, nothing loaded into agent "
                                                  r"nx-nul-a$"):
            a.add_peer(md.replace(b"nx-nul-b", b"nx\0nul-b"))
        assert a.add_peer(md.replace(b"nx-nul-b", b"nx-nul-c")) == "nx-nul-c"
        assert a.add_peer(md) == "nx-nul-b"
    finally:
        a.stop()
        b.stop()


@contextmanager
def pool_pair(kind: str, name: str, slots: int):
    """Two engines with `slots` pool slots of 4 KiB, a transport of `kind` on each (their pools registered, each
    the other's peer): (ea, eb, a, b); the transports are stopped after."""
    Make = NixlTransport if kind == "nixl" else LoopbackTransport
    ea, eb = TransferEngine(num_slots=slots, slot_size=4096), TransferEngine(num_slots=slots, slot_size=4096)
    a, b = Make(ea, f"kvlc-{name}-a-{kind}"), Make(eb, f"kvlc-{name}-b-{kind}")
    try:
        a.register(ea.pool)
        b.register(eb.pool)
        connect_all(a, b)
        yield ea, eb, a, b
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("kind", ["loopback", pytest.param("nixl", marks=needs_nixl)])
def test_the_active_op_follows_the_sessions_role_a_senders_read_is_refused(kind):
    """Found in review (session 26): transfer() did not check the session's role against the op (DESIGN §9: the
    receiver READs from the sender, the sender WRITEs to the receiver).  A READ posted for a *sender* session
    went through and overwrote the KV blocks it was there to send; a receiver's WRITE sent out its empty slot.
    Both are refused now, before anything is exposed or posted (TransportError naming the request, its role and
    the op).  Control: the matching op on each session moves its bytes; the refused session is still Advertised."""
    with pool_pair(kind, "role", 4) as (ea, eb, a, b):
        ea.advertise(1, "sender", 4096)    # a sends request 1: a READ into its slot would overwrite its blocks
        ea.advertise(2, "receiver", 4096)  # a receives request 2: a WRITE would send its empty slot out
        eb.advertise(1, "receiver", 4096)
        eb.advertise(2, "sender", 4096)
        s1, s2, r1, r2 = pool_slot(ea, 1), pool_slot(ea, 2), pool_slot(eb, 1), pool_slot(eb, 2)
        ctypes.memset(s1.addr, 0x5A, s1.nbytes)  # a's blocks to send
        ctypes.memset(r2.addr, 0xA5, r2.nbytes)  # b's blocks to send
        offer1, offer2 = b.expect(1, a.name, r1), b.expect(2, a.name, r2)
        with pytest.raises(RoleRefused, match=r"transfer: request 1 is a sender session: a READ writes into") as ei:
            a.read(1, s1, b.name, offer1)
        # typed (session 27): an executor tells its own bug from a backend failure without reading the message
        assert (ei.value.request, ei.value.op, ei.value.role, ei.value.whose) == (1, "read", "sender", "session")
        with pytest.raises(RoleRefused, match=r"transfer: request 2 is a receiver session: a WRITE reads") as ei:
            a.write(2, s2, b.name, offer2)
        assert (ei.value.request, ei.value.op, ei.value.role, ei.value.whose) == (2, "write", "receiver", "session")
        (refused,) = a.transfer_batch([("read", 1, s1, b.name, offer1)])
        assert isinstance(refused, RoleRefused) and "is a sender session" in str(refused), refused
        assert ea.info(1).state is State.Advertised and ea.info(2).state is State.Advertised
        assert a.stats().live_xfers == 0 and ctypes.string_at(s1.addr, s1.nbytes) == b"\x5a" * s1.nbytes
        # control: each session's own op goes through, and moves the sender's bytes
        assert a.write(1, s1, b.name, offer1) in ("Posted", "CompletedInPost")
        assert a.read(2, s2, b.name, offer2) in ("Posted", "CompletedInPost")
        wait_for(lambda: all(e.info(r).state is State.Quiesced for e in (ea, eb) for r in (1, 2)), 30,
                 "the control's transfers", poll=lambda: (ea.poll(), eb.poll()))
        assert ctypes.string_at(r1.addr, r1.nbytes) == b"\x5a" * r1.nbytes
        assert ctypes.string_at(s2.addr, s2.nbytes) == b"\xa5" * s2.nbytes


@pytest.mark.parametrize("kind", ["loopback", pytest.param("nixl", marks=needs_nixl)])
def test_an_offer_carries_its_sessions_role_and_a_transfer_against_it_is_refused(kind):
    """Found in review (session 26): transfer() checked the op against the local session's role only.  With both
    peers' sessions of request 7 advertised as "sender" (an executor bug), the active sender's WRITE went into the
    passive sender's offered slot and overwrote the KV blocks that side was there to send (silent corruption); two
    "receiver" sessions let the READ take the other's empty slot.  An offer now carries its session's role, and a
    WRITE of a sender's offer or a READ of a receiver's is refused before anything is built (TransportError naming
    the request, the op and the offering side's role), in read(), write() and per item in transfer_batch().
    Controls: the matching pairs move the sender's bytes, also over a role-less offer (an older release's bytes,
    and a bare transport's offer), which is not checked."""
    Make = NixlTransport if kind == "nixl" else LoopbackTransport
    ea, eb = TransferEngine(num_slots=8, slot_size=4096), TransferEngine(num_slots=8, slot_size=4096)
    a, b = Make(ea, f"kvlc-orole-a-{kind}"), Make(eb, f"kvlc-orole-b-{kind}")
    c = Make(None, f"kvlc-orole-c-{kind}")  # a bare transport: its offers carry no role
    bare = ctypes.create_string_buffer(4096)
    try:
        a.register(ea.pool)
        b.register(eb.pool)
        c.register(bare)
        connect_all(a, b, c)
        for r in (7, 8):  # both sides of 7 senders, both of 8 receivers: the executor bug
            role = "sender" if r == 7 else "receiver"
            ea.advertise(r, role, 4096)
            eb.advertise(r, role, 4096)
        s7, s8, p7, p8 = pool_slot(ea, 7), pool_slot(ea, 8), pool_slot(eb, 7), pool_slot(eb, 8)
        for m, byte in ((s7, 0x11), (s8, 0x44), (p7, 0x22), (p8, 0x33)):
            ctypes.memset(m.addr, byte, m.nbytes)
        o7, o8 = b.expect(7, a.name, p7), b.expect(8, a.name, p8)
        write7 = (rf"^transfer: request 7: the offer \(tag {o7.tag}\) from peer {b.name} is a sender session's: a "
                  r"WRITE would overwrite the blocks it is there to send; a WRITE takes a receiver's offer$")
        read8 = (rf"^transfer: request 8: the offer \(tag {o8.tag}\) from peer {b.name} is a receiver session's: a "
                 r"READ would take its empty range; a READ takes a sender's offer$")
        with pytest.raises(RoleRefused, match=write7) as ei:
            a.write(7, s7, b.name, o7)
        assert (ei.value.request, ei.value.op, ei.value.role, ei.value.whose) == (7, "write", "sender", "offer")
        with pytest.raises(RoleRefused, match=read8) as ei:
            a.read(8, s8, b.name, o8.slice(0, 4096))  # (a slice keeps the role)
        assert (ei.value.request, ei.value.op, ei.value.role, ei.value.whose) == (8, "read", "receiver", "offer")
        out = a.transfer_batch([("write", 7, s7, b.name, o7), ("read", 8, s8, b.name, Offer.from_bytes(o8.to_bytes()))])
        for res, why in zip(out, (write7, read8)):
            assert isinstance(res, RoleRefused) and re.match(why, str(res)), res
        assert (o7.role, o8.role) == (Role.sender, Role.receiver)
        assert ea.info(7).state is State.Advertised and ea.info(8).state is State.Advertised
        assert a.stats().live_xfers == 0 and a.stats().posted == 0
        assert ctypes.string_at(p7.addr, p7.nbytes) == b"\x22" * p7.nbytes  # b's blocks to send, untouched
        assert ctypes.string_at(s8.addr, s8.nbytes) == b"\x44" * s8.nbytes
        # controls: a matching pair moves the sender's bytes, through an offer with its role (9: a WRITEs) or an
        # older release's role-less bytes (10: a READs); a bare transport's offer carries no role (11)
        ea.advertise(9, "sender", 4096)
        eb.advertise(9, "receiver", 4096)
        ea.advertise(10, "receiver", 4096)
        eb.advertise(10, "sender", 4096)
        ea.advertise(11, "sender", 4096)
        s9, s10, s11, p9, p10 = (pool_slot(ea, 9), pool_slot(ea, 10), pool_slot(ea, 11), pool_slot(eb, 9),
                                 pool_slot(eb, 10))
        for m, byte in ((s9, 0x99), (p10, 0xAA), (s11, 0xBB)):
            ctypes.memset(m.addr, byte, m.nbytes)
        o9, o10 = b.expect(9, a.name, p9), b.expect(10, a.name, p10)
        o11 = c.expect(11, a.name, Mem(ctypes.addressof(bare), 4096))
        assert (o9.role, o10.role, o11.role) == (Role.receiver, Role.sender, None)
        old10 = struct.pack("<4sQQBQQ", b"KVLO", o10.mem.addr, o10.mem.nbytes, 0, o10.mem.device, o10.tag)
        assert Offer.from_bytes(old10) == Offer(o10.mem, o10.tag) and Offer.from_bytes(old10).role is None
        out = a.transfer_batch([("write", 9, s9, b.name, o9), ("read", 10, s10, b.name, Offer.from_bytes(old10))])
        assert all(r in ("Posted", "CompletedInPost") for r in out), out
        assert a.write(11, s11, c.name, o11) in ("Posted", "CompletedInPost")
        wait_for(lambda: all(e.info(r).state is State.Quiesced for e, rs in ((ea, (9, 10, 11)), (eb, (9, 10)))
                             for r in rs), 30, "the controls' transfers", poll=lambda: (ea.poll(), eb.poll()))
        assert ctypes.string_at(p9.addr, p9.nbytes) == b"\x99" * p9.nbytes
        assert ctypes.string_at(s10.addr, s10.nbytes) == b"\xaa" * s10.nbytes
        assert bare.raw == b"\xbb" * 4096
    finally:
        a.stop()
        b.stop()
        c.stop()


@pytest.mark.parametrize("kind", ["loopback", pytest.param("nixl", marks=needs_nixl)])
def test_a_peer_name_holding_a_nul_is_refused_before_anything_moves(kind):
    """Found by fuzzing (session 20): NIXL takes a peer's name as a C string.  A WRITE to "beta\\0x" went to
    "beta" while the transport filed it under "beta\\0x"; beta's stop then matched no entry and was answered
    "quiesced" at once with the WRITE still live, so beta freed slots it was being written into (5 of 11
    cancelled sessions in the reproduction).  remove_peer("beta\\0x") unloaded "beta" from NIXL but not from
    the transport's records.  Every call that names a peer now refuses a NUL: InvalidArgument naming `peer`,
    the call and request, and the name with \\0 shown; nothing is posted or exposed.  Control: the same
    calls with the real name go through (on the loopback, which matches names exactly, the same refusal)."""
    with pool_pair(kind, "nul", 3) as (ea, eb, a, b):
        ea.advertise(1, "sender", 4096)
        ea.advertise(2, "receiver", 4096)
        eb.advertise(1, "receiver", 4096)
        offer = b.expect(1, a.name, pool_slot(eb, 1))
        bad = b.name + "\0x"
        calls = {
            "write": (lambda p: a.write(1, pool_slot(ea, 1), p, offer), "transfer: request 1"),
            "read": (lambda p: a.read(1, pool_slot(ea, 1), p, offer), "transfer: request 1"),
            "batch": (lambda p: a.transfer_batch([("write", 1, pool_slot(ea, 1), p, offer)])[0], "transfer: request 1"),
            "expect": (lambda p: a.expect(2, p, pool_slot(ea, 2)), "expect: request 2"),
            "forgo": (lambda p: a.forgo(1, p, offer), "forgo: request 1"),
            "remove_peer": (lambda p: a.remove_peer(p), "remove_peer"),
        }
        for what, (call, where) in calls.items():
            with pytest.raises(InvalidArgument) as ei:
                r = call(bad)
                if isinstance(r, Exception):
                    raise r
            assert ei.value.argument == "peer", (what, ei.value)
            assert f"{where}: '{b.name}\\0x' holds a NUL character" in str(ei.value), (what, ei.value)
            assert a.stats().live_xfers == 0 and ea.info(1).state is State.Advertised, what
            assert ea.info(2).state is State.Advertised, what
        # control: the real name (after the refused remove_peer: it unloaded nothing)
        assert a.write(1, pool_slot(ea, 1), b.name, offer) in ("Posted", "CompletedInPost")
        wait_for(lambda: eb.info(1).state is State.Quiesced and ea.info(1).state is State.Quiesced, 30,
                 "the control's WRITE", poll=lambda: (ea.poll(), eb.poll()))
