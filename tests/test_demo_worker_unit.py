"""Unit tests of the demo worker's executor logic, with stand-ins for the engine, transport and torch (no NIXL,
no processes): the order of what the worker does to a request's KV memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

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
    """A post's TransportError schedules a reconnect; the reconnect was made only in the branch that reads the
    injected faults' counter, so with real NIXL and no --faults it never came (review).  It comes before the
    RECONNECT_AFTER_OFFERS + 1st offer after the failed one, once."""
    from lifecycle.demo_worker import RECONNECT_AFTER_OFFERS

    w, done = _poster("receiver", _post_error(None), fail_first=1)
    for req in range(1, RECONNECT_AFTER_OFFERS + 4):
        w._post(req, b"offer")
    assert w.faults is None and w.c["reconnects"] == 1 and w.reconnect_after is None
    assert done.index(("add_peer", b"metadata")) == done.index(("read", RECONNECT_AFTER_OFFERS + 2)) - 1, done


def _poster(role: str, error: Exception, fail_first: int = 1 << 30):
    """A worker whose transfers (offers in hand, the sessions Advertised) raise `error`, the first `fail_first` of
    them (the rest go out); what the worker then does to the sessions, the peer and its connection is logged in the
    list returned."""
    from lifecycle.demo_worker import _Req

    done: list = []
    w = Worker.__new__(Worker)
    w.role, w.peer, w.it, w.reload_peer = role, "peer", 1, False
    w.offers_taken, w.reconnect_after, w.disconnects_seen = 0, None, 0
    w.c = dict(post_errors=0, refused_posts=0, aborts_sent=0, reconnects=0)
    w.out_msgs, w.mid_cancels, w.deferred_waiting = [], {}, set()
    w.opts = DemoOptions(out="unused")
    w.tracked = {i: _Req(p, 4096, 0.0) for i, p in enumerate(client_plan(1, 20, 0.0, 4), start=1)}
    w._slot, w._mem = (lambda req: 0), (lambda slot, n: ("mem", slot, n))
    w.Offer = SimpleNamespace(from_bytes=lambda b: ("offer", b))

    def transfer(req, *args):
        done.append(("read", req))
        if len([d for d in done if d[0] == "read"]) <= fail_first:
            raise error
        return "Posted"

    w.t = SimpleNamespace(read=transfer, write=transfer, forgo=lambda *a: done.append("forgo"),
                          remove_peer=lambda peer: done.append(("remove_peer", peer)),
                          add_peer=lambda md: done.append(("add_peer", md)))
    w.faults, w.peer_lost, w.peer_md = None, "", b"metadata"
    w.engine = SimpleNamespace(state=lambda req: SimpleNamespace(value="Advertised"))
    w._cancel = lambda req, point: done.append("cancel")
    return w, done


def _acts(done: list) -> list:
    """What the worker did to the sessions, the peer and its connection (its transfers left out)."""
    return [d for d in done if not (isinstance(d, tuple) and d[0] == "read")]


@pytest.mark.parametrize("role", ["receiver", "sender"])
def test_a_role_refusal_fails_loudly_instead_of_reconnecting(role):
    """Review (session 27): _post took every TransportError for a disconnect: it cancelled the request, told the
    peer to abort and reconnected, so an executor that copied it hid its own bug (a READ posted for a sender
    session, a WRITE of a sender's offer: DESIGN §9) behind a reconnect, every time.  A role refusal (RoleRefused)
    is raised now, with nothing cancelled, aborted or reconnected.  Control: another TransportError (a backend
    failure) still cancels, aborts and reconnects."""
    from lifecycle import RoleRefused, TransportError

    refusal = RoleRefused("transfer: request 1 is a sender session: a READ writes into its local range")
    w, done = _poster(role, refusal)
    with pytest.raises(RoleRefused):
        w._post(1, b"offer")
    assert _acts(done) == [] and w.out_msgs == [] and w.reconnect_after is None and w.c["post_errors"] == 0
    w, done = _poster(role, TransportError("NIXL call nixl_capi_post_xfer_req failed with status -2 (request 1)"))
    w._post(1, b"offer")
    assert _acts(done) == ["forgo", "cancel"] and w.out_msgs == [("abort", 1)] and w.reconnect_after is not None
    assert w.c["post_errors"] == 1


def _post_error(call: str | None):
    from lifecycle import TransportError

    e = TransportError(f"NIXL call nixl_capi_{call} failed with status -2 (request 1)" if call else
                       "post: request 1: peer peer disconnected (injected)")
    if call:
        e.call, e.status = call, -2
    return e


def test_a_failed_nixl_post_reconnects_with_remove_peer_then_add_peer():
    """Review (session 27), measured with NIXL 1.5.1: after a failed post NIXL takes the peer for disconnected, and
    add_peer() of its metadata alone loads without reconnecting: every later transfer to it failed (and Poisoned a
    slot on each side), so the demo's reconnect, add_peer() only, never got it back with real NIXL.  After a
    failed NIXL post (TransportError.call "post_xfer_req") the reconnect is remove_peer() then add_peer() now.
    Control: an injected disconnect (Faults: refused in prepare, no `call`) still only reloads the metadata,
    which is what reconnects it there, without failing the peer's other sessions."""
    w, done = _poster("receiver", _post_error("post_xfer_req"))
    w._post(1, b"offer")
    w._reconnect()  # (due: the next offers bring it)
    assert _acts(done)[-2:] == [("remove_peer", "peer"), ("add_peer", b"metadata")] and w.c["reconnects"] == 1
    assert len(_acts(done)) == 4 and w.reconnect_after is None
    # a transfer refused for that mark (PeerDisconnected: an earlier post failed; no `call`) reconnects the same way
    from lifecycle import PeerDisconnected

    w, done = _poster("receiver", PeerDisconnected("transfer: request 1: ... refused before the expose ..."))
    w._post(1, b"offer")
    w._reconnect()
    assert _acts(done)[-2:] == [("remove_peer", "peer"), ("add_peer", b"metadata")]
    # control: an injected disconnect
    w, done = _poster("receiver", _post_error(None))
    w._post(1, b"offer")
    w._reconnect()
    assert _acts(done) == ["forgo", "cancel", ("add_peer", b"metadata")]


class _Died(Exception):
    pass


def _victim(tmp_path, monkeypatch, *, mode: str, role: str, kill_at: float | None = 0.4, plans=None):
    import os
    import signal

    (tmp_path / "status").mkdir(parents=True, exist_ok=True)
    w = Worker.__new__(Worker)
    w.role, w.rank, w.name = role, 0, f"{role}-0"
    w.peer_role = "receiver" if role == "sender" else "sender"
    w.opts = DemoOptions(out=str(tmp_path), mode=mode, requests=100, kill_at=kill_at)
    w.out = tmp_path
    w.c = {}
    w.kill_asked = False
    posted = []
    w._status = lambda now: posted.append("status")
    w.engine = SimpleNamespace(poll=lambda: posted.append("poll"))
    w._post = lambda req, desc: posted.append(req)
    plans = plans or {}
    w.plan = [SimpleNamespace(request=i + 1, blocks=1, cancel_after=0,
                              cancel_side=plans.get(i + 1, (None, None))[0], cancel_at=plans.get(i + 1, (None, None))[1])
              for i in range(100)]
    w.tracked = {i + 1: SimpleNamespace(cancelled=False, plan=w.plan[i]) for i in range(100)}
    w._advertise = lambda plan: SimpleNamespace(plan=plan)
    w.t = SimpleNamespace(expect=lambda *a: SimpleNamespace(to_bytes=lambda: b"o"))
    w.peer, w.out_msgs, w.it, w.mid_cancels = "peer", [], 1, {}
    w._mem = lambda slot, n: None
    w._slot = lambda req: 0
    w._expose_done = lambda req: None
    w._mine = lambda plan, point: False

    def fake_kill(pid, sig):
        assert pid == os.getpid() and sig == signal.SIGKILL
        raise _Died

    monkeypatch.setattr(os, "kill", fake_kill)
    return w, posted


def test_kill_peer_victim_dies_with_a_survivors_offer_in_hand(tmp_path, monkeypatch):
    """kill-peer: the launcher killed the active side when the survivor's status passed --kill-at; a kill between
    two batches found the survivor with no session and the run failed ("kill-peer cut nothing: receiver-0 had no
    session live when it lost its peer": `demo --requests 500 --concurrency 256 --mode write --cancel-fraction 0.5
    --faults delay,kill-peer --seed 8403 --kill-at 0.4`; and `--requests 300 --mode write --cancel-fraction 1
    --faults disconnect,drop-notif,kill-peer --seed 1889 --kill-at 0.1`).  The victim now kills itself at the offer
    of the first request past the kill point, before posting it (the survivor's exposed session is cut), and writes
    the kill time the survivor and the launcher read."""
    import json

    from lifecycle.demo_worker import KILL_TIME_FILE

    w, posted = _victim(tmp_path, monkeypatch, mode="write", role="sender")
    w._handle(("target", 40, b"desc"))  # 40 of 100: not past 0.4
    with pytest.raises(_Died):
        w._handle(("target", 41, b"desc"))
    # the engine's queued records are logged first (a victim killed before its first poll left an empty log:
    # the audit's no_events, READ --concurrency 256 --kill-at 0.7 of 300 requests, seed 5674)
    assert posted == [40, "poll", "status"]
    assert json.loads((tmp_path / "status" / KILL_TIME_FILE).read_text())["victim"] == "sender-0"
    w, posted = _victim(tmp_path / "r", monkeypatch, mode="read", role="receiver")
    with pytest.raises(_Died):
        w._handle(("offer", 77, b"desc"))
    assert posted == ["poll", "status"]


def test_kill_peer_skips_an_offer_the_survivor_cancels_in_flight(tmp_path, monkeypatch):
    """`demo --requests 200 --concurrency 1 --mode write --cancel-fraction 0.9 --faults delay,kill-peer --seed 3591
    --transfer-timeout 5 --cancel-grace 5`: the survivor's one exposed session was one it cancels mid-transfer; its
    stop reached the victim's transport before the kill, which acked it: cut nothing.  Such an offer is skipped."""
    w, posted = _victim(tmp_path, monkeypatch, mode="write", role="sender",
                        plans={41: ("receiver", "mid_transfer"), 42: ("sender", "mid_transfer")})
    w._handle(("target", 41, b"desc"))
    assert posted == [41]  # (posted)
    with pytest.raises(_Died):  # the control: the victim's own cancel does not matter (it dies first)
        w._handle(("target", 42, b"desc"))


@pytest.mark.parametrize("mode,role,kill_at", [
    ("write", "receiver", 0.4),   # the survivor never kills itself
    ("read", "sender", 0.4),
    ("read", "receiver", None),   # no kill-peer
    ("read", "receiver", 1.0),    # no request is past 1.0
])
def test_kill_peer_control_no_kill_on_the_survivor_or_without_kill_peer(tmp_path, monkeypatch, mode, role, kill_at):
    from lifecycle.demo_worker import KILL_TIME_FILE

    w, posted = _victim(tmp_path, monkeypatch, mode=mode, role=role, kill_at=kill_at)
    kind = "target" if role == "sender" else "offer"
    w._handle((kind, 100, b"desc"))
    assert posted == [100]
    assert not (tmp_path / "status" / KILL_TIME_FILE).exists()


def _ending_sender(*, peer_lost: str = ""):
    """A WRITE-mode sender whose run is over but for the receiver's end_ack, which the next intake brings; a failed
    NIXL post just scheduled its reconnect (remove_peer + add_peer, due a few offers on).  run() ends at the ack."""
    import time

    done: list = []
    w = Worker.__new__(Worker)
    w.role, w.rank, w.name, w.peer, w.peer_md = "sender", 0, "sender-0", "peer", b"metadata"
    w.opts = DemoOptions(out="unused", mode="write", requests=1)
    w.group, w.faults = SoloGroup(), None
    w.tracked, w.mid_cancels, w.out_msgs = {}, {}, []
    w.it, w.next_req, w.t_start, w._last_status = 0, 2, time.monotonic(), time.monotonic()
    w._ppid = __import__("os").getppid()
    w.c = dict(reconnects=0)
    w.peer_lost = peer_lost
    w.end_sent, w.end_received, w.ack_sent, w.ack_received = True, False, False, False
    w.offers_taken, w.reconnect_after, w.reload_peer = 1, 5, True  # pending (no offer brings it before the end)
    acks = [[("end_ack",)]]
    w.chan = SimpleNamespace(recv_all=lambda: acks.pop() if acks else [], send=lambda msgs: None,
                             wait=lambda timeout: None)
    w.engine = SimpleNamespace(poll=lambda: [])
    w.t = SimpleNamespace(remove_peer=lambda peer: done.append(("remove_peer", peer)),
                          add_peer=lambda md: done.append(("add_peer", md)))
    w._status = lambda now: None
    w._finish = lambda: done.append("finish")
    return w, done


def test_a_reconnect_still_pending_when_the_run_ends_is_made_before_it_ends():
    """A failed NIXL post schedules a reconnect (a few offers on); with NIXL's mark the transport files a health
    reason ("peer ... disconnected after a failed post") until remove_peer().  A post failing on the last request of a
    WRITE run (the sender finalizes its Poisoned session at once, the receiver acks the end within a few ms) ended
    the loop first: the peer was never reconnected and the sender ended unhealthy, so the demo FAILED ("sender-0
    unhealthy at the end") on a recovered fault.  The reconnect is made before the loop ends now."""
    w, done = _ending_sender()
    w.run()
    assert done == [("remove_peer", "peer"), ("add_peer", b"metadata"), "finish"], done
    assert w.reconnect_after is None and w.c["reconnects"] == 1
    # control: a lost peer is not reconnected (its remove_peer came with the loss), and the loop still ends
    w, done = _ending_sender(peer_lost="control channel closed (EOFError)")
    w.run()
    assert done == ["finish"], done


def _disconnect_run(monkeypatch, rolls: set, batch: int, step: float) -> list:
    """A READ receiver's run() over 40 offers, `batch` of them per intake, its clock `step` seconds on per intake.
    Its transport stands in for Faults' disconnect: the post of a request in `rolls` disconnects the peer (counted
    in fault_stats at the post), a transfer while disconnected is refused (TransportError, as in prepare), and
    add_peer() reconnects.  Returns what the worker did: each post, refusal and reconnect, in order."""
    from lifecycle import TransportError
    from lifecycle import collectives
    from lifecycle import demo_worker as dw
    from lifecycle.demo_worker import _Req

    clock = [1000.0]
    monkeypatch.setattr(dw, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=lambda s: None))
    log: list = []
    link = SimpleNamespace(down=False, disconnects=0)

    def read(req, local, peer, offer):
        if link.down:
            log.append(("refused", req))
            raise TransportError(f"post: request {req}: peer peer disconnected (injected)")
        log.append(("posted", req))
        if req in rolls:
            link.down, link.disconnects = True, link.disconnects + 1
        return "Posted"

    def add_peer(md):
        link.down = False
        log.append("reconnect")

    w = Worker.__new__(Worker)
    w.role, w.rank, w.name, w.peer, w.peer_md, w.peer_role = "receiver", 0, "receiver-0", "peer", b"md", "sender"
    w.opts = DemoOptions(out="unused", requests=40, faults=("disconnect",))
    w.plan = client_plan(0, 40, 0.0, 4)
    w.group, w.faults = SoloGroup(), SimpleNamespace(disconnect=0.5)
    w.t = SimpleNamespace(read=read, add_peer=add_peer, remove_peer=lambda peer: log.append("remove_peer"),
                          forgo=lambda *a: None, fault_stats=lambda: {"disconnects": link.disconnects})
    w.engine = SimpleNamespace(state=lambda req: SimpleNamespace(value="Advertised"))
    w.Offer = SimpleNamespace(from_bytes=lambda b: b)
    w._slot, w._mem = (lambda req: 0), (lambda slot, n: None)
    w.tracked, w.mid_cancels, w.out_msgs, w.deferred_waiting = {}, {}, [], set()
    w.c = dict(started=0, post_errors=0, refused_posts=0, aborts_sent=0, reconnects=0)
    w.it, w.t_start, w._last_status, w._ppid = 0, clock[0], clock[0], __import__("os").getppid()
    w.peer_lost, w.kill_asked, w.reload_peer, w.disconnects_seen = "", False, False, 0
    w.end_sent, w.end_received, w.ack_sent, w.ack_received = False, False, False, False
    w.offers_taken, w.reconnect_after = 0, None
    w._advertise = lambda plan: w.tracked.setdefault(plan.request, _Req(plan, 4096, clock[0]))
    w._cancel = lambda req, point: setattr(w.tracked[req], "cancelled", True)
    w._finalize = lambda req, completed, failed: w.tracked.pop(req)
    w._status = lambda now: None
    w._finish = lambda: log.append("finish")
    msgs = [("offer", r, b"desc") for r in range(1, 41)] + [("end",)]
    intakes = [msgs[i:i + batch] for i in range(0, len(msgs), batch)]

    def recv_all():
        clock[0] += step
        return intakes.pop(0) if intakes else []

    w.chan = SimpleNamespace(recv_all=recv_all, send=lambda m: None, wait=lambda timeout: None)
    monkeypatch.setattr(collectives, "poll_symmetric", lambda engine, group, reqs: SimpleNamespace(
        failed=set(), terminal=set(reqs), completed=set(reqs), poisoned=set()))  # every session ends at once
    w.run()
    return log


def test_a_disconnect_refuses_the_same_offers_whatever_the_clock_and_the_intake_batches(monkeypatch):
    """--faults disconnect: the loop read the fault counter every 8 iterations and reconnected 20 ms later, so which
    requests a disconnect refused followed the clock and how offers were batched, and a failing demo seed did not
    replay them.  The reconnect now comes before the RECONNECT_AFTER_OFFERS + 1st offer after the disconnecting post
    (or at the end of the run): one offer per intake 1 ms apart and eight per intake 30 ms apart refuse the same
    requests.  Control: the disconnects refuse something, and reconnect (later posts go out)."""
    from lifecycle.demo_worker import RECONNECT_AFTER_OFFERS as n

    slow = _disconnect_run(monkeypatch, {3, 20, 38}, batch=1, step=0.001)
    assert _disconnect_run(monkeypatch, {3, 20, 38}, batch=8, step=0.03) == slow
    refused = [r for e, r in (x for x in slow if isinstance(x, tuple)) if e == "refused"]
    assert refused == [*range(4, 4 + n), *range(21, 21 + n), 39, 40], slow
    assert slow.count("reconnect") == 3 and slow[-2:] == ["reconnect", "finish"]  # (the last one: at the end)


@pytest.mark.parametrize("opts, said", [
    ("{missing}", "No such file"),                           # a path that is not there
    ("{text}", "not JSON"),
    ("{list}", "expected a JSON object"),                   # a file holding a JSON list
    ('{"out": "x", "mode": "write", "requests": 10, "concurency": 4}', "unknown field(s) concurency"),
    ('{"mode": "write"}', "missing field(s) out"),
    ('{"out": "x", "requests": "10"}', "requests: expected an integer"),
    ('{"out": "x", "faults": ["delay", 1]}', "faults: expected a list"),
    ('{"out": "x", "faults": "delay"}', "faults: expected a list"),
    ('{"out": "x", "kv": {"heads": 8}}', "kv: unknown field(s) heads"),
    ('{"out": "x", "kv": {"kv_heads": 8.5}}', "kv: kv_heads: expected an integer"),
    ('{"out": "x", "kv": [8]}', "kv: expected a JSON object"),
])
def test_worker_options_written_by_hand_are_refused_with_a_message(tmp_path, capsys, opts, said):
    """docs/demo.md: on a cluster, write options.json by hand ("the fields of DemoOptions") and launch
    `python -m lifecycle.demo_worker --opts FILE` under the site's MPI.  A missing file, text that is not JSON or a
    misspelt or missing field ended every rank with a traceback (FileNotFoundError, JSONDecodeError, TypeError from
    DemoOptions.__init__, KeyError 'kv'), and a field of the wrong type only failed inside the run.  Now: exit 2 and
    one line that names the problem, before MPI is touched."""
    from lifecycle.demo_worker import main

    (tmp_path / "text").write_text("out: x\n")
    (tmp_path / "list").write_text('["out", "x"]')
    for name in ("missing", "text", "list"):
        opts = opts.replace("{%s}" % name, str(tmp_path / name))
    arg = opts
    assert main(["--opts", arg]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and err.startswith("demo_worker: --opts"), err


def test_worker_options_round_trip_and_leave_defaults_out():
    """Control: what the launcher writes (to_json) reads back the same; fields left out take their defaults."""
    from lifecycle.demo_worker import KVConfig

    o = DemoOptions(out="x", mode="write", faults=("delay", "error"), kill_at=0.5, kv=KVConfig(kv_heads=4),
                    transfer_timeout=1)
    assert DemoOptions.from_json(o.to_json()) == o
    assert DemoOptions.from_json('{"out": "x", "kill_at": 1}') == DemoOptions(out="x", kill_at=1)
