"""Unit tests of the demo worker's executor logic, with stand-ins for the engine, transport and torch (no NIXL,
no processes): the order of what the worker does to a request's KV memory."""

from __future__ import annotations

from types import SimpleNamespace

from lifecycle.demo_worker import DemoOptions, SoloGroup, Worker, client_plan


class _Events(list):
    pass


def _worker(tmp_path, *, mode: str, cuda: bool, requests: int = 3):
    ev = _Events()
    opts = DemoOptions(out=str(tmp_path), mode=mode, requests=requests, concurrency=8)
    w = Worker.__new__(Worker)
    w.role, w.opts, w.rank, w.shards = "sender", opts, 0, 1
    w.plan = client_plan(opts.seed, opts.requests, 0.0, opts.kv.max_blocks)
    w.block_bytes = opts.kv.block_bytes()
    w.group = SoloGroup()
    w.tracked, w.next_req, w.it, w.out_msgs, w.mid_cancels = {}, 1, 1, [], {}
    w.c = dict(started=0)
    w.peer, w.peer_lost, w.end_sent = "peer", "", False
    slots = {}

    def advertise(req, role, nbytes):
        slots[req] = len(slots)
        ev.append(("advertise", req))

    w.engine = SimpleNamespace(advertise=advertise, info=lambda req: SimpleNamespace(slot=slots[req]),
                               pool=SimpleNamespace(stats=lambda: {"free": 100}))
    w.torch = SimpleNamespace(
        bitwise_xor=lambda a, k, out: ev.append(("fill", k)),
        cuda=SimpleNamespace(synchronize=lambda dev=None: ev.append(("cuda.synchronize", dev))))
    w.base = list(range(1 << 20))
    w.slot_tensors = [list(range(1 << 20)) for _ in range(16)]
    w.device = "cuda" if cuda else "cpu"
    w.cuda_dev = 0 if cuda else None
    w._mem = lambda slot, n: ("mem", slot, n)
    w.t = SimpleNamespace(expect=lambda req, peer, mem: (ev.append(("expect", req)),
                                                         SimpleNamespace(to_bytes=lambda: b"offer"))[1])
    return w, ev


def test_cuda_prefill_is_finished_before_the_slot_is_exposed(tmp_path):
    """READ mode on a GPU: the fill kernel is asynchronous and NIXL reads VRAM outside torch's stream order, so
    the worker must wait for the kernel before expect() hands the slot to the peer (it exposed the slot, and
    shipped the offer, with the kernel possibly still queued: the peer could READ the previous bytes)."""
    w, ev = _worker(tmp_path, mode="read", cuda=True)
    w._start_requests()
    kinds = [e[0] for e in ev]
    assert kinds.count("expect") == 3
    for i, k in enumerate(kinds):
        if k == "expect":
            last_fill = max(j for j in range(i) if kinds[j] == "fill")
            assert "cuda.synchronize" in kinds[last_fill + 1:i], kinds


def test_cuda_prefill_is_finished_before_a_write_can_be_posted(tmp_path):
    """WRITE mode: the sender fills at admission and posts when the target arrives: the fill is fenced at once."""
    w, ev = _worker(tmp_path, mode="write", cuda=True, requests=2)
    w._start_requests()
    kinds = [e[0] for e in ev]
    assert kinds == ["advertise", "fill", "cuda.synchronize"] * 2, kinds
    assert [m[0] for m in w.out_msgs] == ["want", "want"]


def test_host_memory_needs_no_cuda_fence(tmp_path):
    w, ev = _worker(tmp_path, mode="read", cuda=False, requests=2)
    w._start_requests()
    assert "cuda.synchronize" not in [e[0] for e in ev]


def _exit_three() -> None:
    import sys

    sys.exit(3)


def test_kill_peer_does_not_signal_a_victim_that_already_exited(tmp_path):
    """kill-peer: a victim that crashed before the kill point is not killed (its reaped pid raised
    ProcessLookupError out of the launcher; an unreaped one counted as killed and hid the crash)."""
    import multiprocessing as mp

    from lifecycle.demo import _Launch

    (tmp_path / "status").mkdir()
    launch = _Launch(DemoOptions(out=str(tmp_path)))
    p = mp.get_context("spawn").Process(target=_exit_three)
    p.start()
    p.join(30)
    launch.procs["receiver-0"] = p
    assert launch.kill("receiver-0") is False
    assert launch.killed == {}
    assert not (tmp_path / "status" / "kill-time").exists()
    assert launch.exit_codes() == {"receiver-0": 3}


def test_a_post_error_reconnects_without_injected_faults():
    """A post's TransportError schedules a reconnect (reconnect_at); the reconnect was made only in the branch
    that reads the injected faults' counter, so with real NIXL and no --faults it never came (review)."""
    import time

    added = []
    w = Worker.__new__(Worker)
    w.faults, w.peer_lost, w.it, w.peer_md = None, "", 1, b"metadata"
    w.c = dict(reconnects=0)
    w.t = SimpleNamespace(add_peer=added.append)
    w.reconnect_at = time.monotonic() - 1  # due
    w._check_disconnects()
    assert added == [b"metadata"] and w.c["reconnects"] == 1 and w.reconnect_at == 0.0
    w._check_disconnects()  # nothing due: no second reconnect
    assert added == [b"metadata"]
