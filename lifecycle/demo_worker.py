"""One side of ``lifecycle demo``: a context (sender) or generation (receiver) worker.

Theory of operation
-------------------
Each worker is an application that embeds the library: it configures structlog (JSON lines to its
own file), creates a :class:`~lifecycle.TransferEngine` whose buffer-pool slots hold the KV cache
(or a CUDA arena indexed by the same slots), registers them with a :class:`NixlTransport`
(optionally wrapped in :class:`Faults`), exchanges NIXL metadata with its peer over a control
channel (a multiprocessing Pipe, or MPI point-to-point in ``--ranks`` mode) and then runs one loop:

    intake control messages -> start requests (sender) -> planned cancels -> poll_symmetric
    -> finalize what every rank of this side agrees is terminal -> flush control messages

READ mode (default): the sender advertises, fills the slot with the request's pattern ("prefill"),
``expect``s (expose) and ships the slot descriptor (``offer``); the receiver advertises and READs.
WRITE mode: the sender advertises and fills, asks for a target (``want``); the receiver advertises,
``expect``s and ships its descriptor (``target``); the sender WRITEs.  Completion is evidence from
the transport only (DONE on the active side, the peer's notification on the passive side).

The client driver (:func:`client_plan`, a pure function of the seed, so every process and rank
computes the same plan without shipping it) decides which requests are cancelled, by which side and
at which point: ``before_expose`` (advertised, never exposed), ``mid_transfer`` (a few loop
iterations after expose) or ``after_completion`` (terminal, before terminate).  A cancelling side
calls ``terminate`` at once, so cancels of exposed sessions exercise deferred termination.

Ranks: with K ranks per side every rank moves its shard of the kv heads; ``poll_symmetric`` makes
all ranks of one side finalize the same requests in the same iteration (failed on any rank: union;
completed only if completed on every rank), and new requests start only in counts every rank can
afford (``agree_count``).  Single-rank mode runs the same code with a one-rank group.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["DemoOptions", "KVConfig", "Plan", "client_plan", "run_pipe_worker", "main"]

FAULT_RATES = {  # probability per transfer (status faults) or per incoming notification
    "delay": ("delay", 0.05),
    "error": ("error", 0.01),
    "disconnect": ("disconnect", 0.0008),
    "drop-notif": ("drop_notification", 0.01),
}
CANCEL_POINTS = ("before_expose", "mid_transfer", "after_completion")
# A disconnect (injected, or a failed NIXL post) is reconnected before the active side handles this many more offers
# (its own count of offers and targets to post, which follows the peer's order of offers, not the clock): a seed
# replays which requests a disconnect refuses.  It replaced 20 ms of wall clock (about 5 offers at the demo's rate).
RECONNECT_AFTER_OFFERS = 4


@dataclass(frozen=True)
class KVConfig:
    """A small Llama-like KV layout: per block ``layers x 2 (K,V) x block_tokens x kv_heads x head_dim``."""

    layers: int = 4
    block_tokens: int = 16
    kv_heads: int = 8
    head_dim: int = 64
    max_blocks: int = 4
    dtype_bytes: int = 2  # fp16

    def slot_bytes(self, shards: int = 1) -> int:
        """One request's pool slot: max_blocks blocks."""
        return self.block_bytes(shards) * self.max_blocks

    def block_bytes(self, shards: int = 1) -> int:
        return self.layers * 2 * self.block_tokens * (self.kv_heads // shards) * self.head_dim * self.dtype_bytes

    def shape(self, blocks: int, shards: int = 1) -> tuple[int, ...]:
        return (blocks, self.layers, 2, self.block_tokens, self.kv_heads // shards, self.head_dim)


@dataclass(frozen=True)
class DemoOptions:
    """Everything a worker needs (picklable, JSON-able)."""

    out: str
    mode: str = "read"
    requests: int = 3000
    concurrency: int = 64
    cancel_fraction: float = 0.0
    faults: tuple[str, ...] = ()
    seed: int = 0
    transfer_timeout: float = 2.0
    cancel_grace: float = 2.0
    progress_deadline: float = 10.0
    wedge_slack: float = 5.0
    deadline: float = 120.0
    ranks: int = 1
    corrupt_one: bool = False
    kv: KVConfig = field(default_factory=KVConfig)
    quarantine_slack: int = 256
    device: str = "auto"
    kill_at: float | None = None  # kill-peer: the victim kills itself past this fraction (see KILL_TIME_FILE)

    @property
    def wedge_bound(self) -> float:
        """A session not finished this long after it started counts as wedged."""
        return 2 * (self.transfer_timeout + self.cancel_grace) + self.wedge_slack

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> DemoOptions:
        """The options the launcher wrote (to_json), or written by hand (docs/demo.md: a site's MPI): fields left out
        take their defaults; anything else raises InvalidArgument("opts") naming it (it ended every rank with a
        traceback, or failed inside the run)."""
        from .errors import InvalidArgument

        try:
            d = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument("opts", f"not JSON ({exc})") from None
        d = _checked_fields(cls, d, "")
        if "kv" in d:
            d["kv"] = KVConfig(**_checked_fields(KVConfig, d["kv"], "kv: "))
        if "faults" in d:
            if not all(isinstance(f, str) for f in d["faults"]):
                got = json.dumps(d["faults"])
                raise InvalidArgument("opts", f"faults: expected a list of fault names, got {got:.60}")
            d["faults"] = tuple(d["faults"])
        return cls(**d)


# a field's annotation -> the JSON values it takes, and how to say it
_FIELD_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
                "bool": ((bool,), "true or false"), "float | None": ((int, float, type(None)), "a number or null"),
                "KVConfig": ((dict,), "a JSON object (the fields of KVConfig)"),
                "tuple[str, ...]": ((list,), "a list of fault names")}


def _checked_fields(cls, d, where: str) -> dict:
    """``d`` as keyword arguments of the dataclass ``cls`` (JSON types), or InvalidArgument("opts") naming what is
    wrong: not an object, an unknown or missing field, a value of another type."""
    from dataclasses import MISSING, fields

    from .errors import InvalidArgument

    if not isinstance(d, dict):
        raise InvalidArgument("opts", f"{where}expected a JSON object (the fields of {cls.__name__}), got "
                                      f"{type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise InvalidArgument("opts", f"{where}unknown field(s) {', '.join(unknown)} (the fields of {cls.__name__}: "
                                      f"{', '.join(known)})")
    missing = [n for n, f in known.items() if n not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise InvalidArgument("opts", f"{where}missing field(s) {', '.join(missing)}")
    for name, value in d.items():
        want, said = _FIELD_TYPES[known[name].type]
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            raise InvalidArgument("opts", f"{where}{name}: expected {said}, got {json.dumps(value):.60}")
    return d


@dataclass(frozen=True, slots=True)
class Plan:
    request: int
    blocks: int
    cancel_side: str | None  # "sender" | "receiver" | None
    cancel_at: str | None  # one of CANCEL_POINTS
    cancel_after: int  # loop iterations after expose (mid_transfer)


def client_plan(seed: int, n: int, fraction: float, max_blocks: int) -> list[Plan]:
    """The client driver: request sizes and which requests get cancelled where (pure function of seed)."""
    rng = random.Random(seed * 7919 + 17)
    out = []
    for req in range(1, n + 1):
        blocks = rng.randint(1, max_blocks)
        if rng.random() < fraction:
            out.append(Plan(req, blocks, rng.choice(("sender", "receiver")), rng.choice(CANCEL_POINTS),
                            rng.randint(0, 3)))
        else:
            out.append(Plan(req, blocks, None, None, 0))
    return out


def fault_seed(seed: int, role: str, rank: int) -> int:
    """The fault seed of one side's rank, derived from the run's --seed (each rank's own, every one replayable)."""
    return seed * 1000 + (0 if role == "sender" else 100) + rank


def make_faults(opts: DemoOptions, role: str, rank: int):
    if not opts.faults:
        return None
    from .transport import Faults

    kw = {}
    for name in opts.faults:
        if name in FAULT_RATES:
            key, p = FAULT_RATES[name]
            kw[key] = p
    if not kw:
        return None
    return Faults(seed=fault_seed(opts.seed, role, rank), **kw)


# ---- control channels -----------------------------------------------------------------------------
class PeerLost(Exception):
    """The control channel to the peer closed (the peer process died)."""


class PipeChannel:
    def __init__(self, conn):
        self.conn = conn

    def send(self, msgs: list) -> None:
        try:
            self.conn.send(msgs)
        except (OSError, EOFError, ValueError) as exc:
            raise PeerLost(f"control channel send failed: {type(exc).__name__}") from None

    def recv_all(self) -> list:
        out: list = []
        try:
            while self.conn.poll(0):
                out.extend(self.conn.recv())
        except (OSError, EOFError) as exc:
            if out:
                return out  # deliver what arrived; the next call raises
            raise PeerLost(f"control channel closed ({type(exc).__name__})") from None
        return out

    def wait(self, timeout: float) -> None:
        try:
            self.conn.poll(timeout)
        except (OSError, EOFError):
            pass


class MpiChannel:
    TAG = 4242

    def __init__(self, comm, peer: int):
        self.comm, self.peer = comm, peer
        self._reqs: list = []

    def send(self, msgs: list) -> None:
        self._reqs.append(self.comm.isend(msgs, dest=self.peer, tag=self.TAG))
        if len(self._reqs) > 32:
            self._reqs = [r for r in self._reqs if not r.Test()]

    def recv_all(self) -> list:
        out: list = []
        while self.comm.iprobe(source=self.peer, tag=self.TAG):
            out.extend(self.comm.recv(source=self.peer, tag=self.TAG))
        return out

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.0005))

    def close(self, timeout: float = 60.0) -> None:
        """Collective over the whole job (every rank of both sides).  Keep receiving (and dropping) the peer's
        messages until every rank's sends are through and every rank is here (a non-blocking barrier), then return.
        Soaking --ranks 2 at --deadline: a side that ended first finalized MPI and exited with the other side's
        offers unreceived while that side still waited out its exposed sessions; the job then SIGKILLed it, which
        wrote no summary (`mpiexec exited with code 9`), and its own Wait() on an unreceived send could never end.
        Bounded by ``timeout`` (a peer that never comes: exit anyway, as before)."""
        end = time.monotonic() + timeout
        barrier = None
        while time.monotonic() < end:
            self.recv_all()  # (the run is over: what the peer still sent only has to be taken off the wire)
            self._reqs = [r for r in self._reqs if not r.Test()]
            if barrier is None and not self._reqs:
                barrier = self.comm.Ibarrier()
            if barrier is not None and barrier.Test():
                return
            time.sleep(0.0005)


class SoloGroup:
    """A one-rank stand-in for :class:`~lifecycle.collectives.RankGroup` (single-rank mode): the same
    consensus code runs, the collectives are identities."""

    rank, size = 0, 1

    def __init__(self):
        self._seq = 0

    def statistics(self):
        from types import SimpleNamespace

        return SimpleNamespace(seq=self._seq)

    def allgather_ints(self, values, *, site=None):
        import numpy as np

        self._seq += 1
        return [np.ascontiguousarray(values, dtype=np.int64)]

    def agree_count(self, n: int, *, site=None) -> int:
        return int(n)

    def all_ranks(self, flag: bool, *, site=None) -> bool:
        return bool(flag)

    def allreduce_ints(self, values, op="sum", *, site=None):
        import numpy as np

        return np.asarray(values, dtype=np.int64)

    def close(self) -> None:
        pass


def configure_logging(path: Path):
    """The application's structlog configuration: one JSON object per line, flushed per line."""
    import structlog

    f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    structlog.configure(processors=[structlog.processors.JSONRenderer()],
                        logger_factory=structlog.WriteLoggerFactory(file=f), cache_logger_on_first_use=True)
    return f


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# kill-peer: the launcher's kill time (JSON, in status/; not *.json, which are the workers' status files)
KILL_TIME_FILE = "kill-time"
# kill-peer: the victim (the active side), when the offer of the first request past --kill-at of the run arrives
# (see Worker._kill_due), writes KILL_TIME_FILE and SIGKILLs itself there, before posting it, so the survivor holds at
# least that exposed session, which can never get evidence now.  (The launcher used to kill when the survivor's
# status passed the kill point: a kill between two batches, or in a run that ends every session in the iteration
# that starts it, found the survivor with no session live and the run failed, "kill-peer cut nothing", at
# --kill-at 0.4 or 0.1.  Timed on the victim's finalized count, with fewer requests left than --concurrency, the
# last offers had all arrived before the point: no kill, "the run ended before the kill point" at --kill-at 0.7.
# A victim that stopped and waited for the launcher's SIGKILL still answered the survivor's stops from its
# transport's thread: with --transfer-timeout 0.001 the cut sessions ended Quiesced(cancelled).)


def kill_victim(mode: str) -> str:
    """kill-peer's victim: the active side (READ: the receiver; WRITE: the sender)."""
    return "receiver" if mode == "read" else "sender"


# ---- the worker --------------------------------------------------------------------------------------
class _Req:
    __slots__ = ("plan", "nbytes", "t0", "exposed_at", "cancelled", "terminate_called", "active", "desc", "checked")

    def __init__(self, plan: Plan, nbytes: int, t0: float):
        self.plan, self.nbytes, self.t0 = plan, nbytes, t0
        self.exposed_at = -1  # loop iteration of expose
        self.cancelled = False
        self.terminate_called = False
        self.active = False
        self.desc = None  # remote descriptor (bytes) for the active side
        self.checked = False


class Worker:
    def __init__(self, role: str, opts: DemoOptions, rank: int, shards: int, chan, group):
        import torch

        from . import TransferEngine
        from .transport import Mem, NixlTransport, Offer

        self.role, self.opts, self.rank, self.shards = role, opts, rank, shards
        self.chan, self.group = chan, group
        self.torch, self.Mem, self.Offer = torch, Mem, Offer
        self.peer_role = "receiver" if role == "sender" else "sender"
        self.name = f"{role}-{rank}"
        self.out = Path(opts.out)
        self.plan = client_plan(opts.seed, opts.requests, opts.cancel_fraction, opts.kv.max_blocks)
        self.block_bytes = opts.kv.block_bytes(shards)
        slot_size = opts.kv.slot_bytes(shards)
        self.num_slots = opts.concurrency + opts.quarantine_slack
        self.engine = TransferEngine(
            rank=rank, slot_size=slot_size, num_slots=self.num_slots, transfer_timeout=opts.transfer_timeout,
            cancel_grace=opts.cancel_grace, progress_deadline=opts.progress_deadline,
            quarantine_budget=opts.quarantine_slack, on_terminate=self._on_terminate)
        use_cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
        self.device = "cuda" if use_cuda else "cpu"
        self.faults = make_faults(opts, role, rank)
        self.t = NixlTransport(self.engine, self.name, faults=self.faults)
        pool = self.engine.pool
        self.cuda_dev: int | None = None  # the CUDA device of the arena (None: host memory)
        if use_cuda:  # the KV cache lives on the GPU; the engine's slots index the arena (VRAM for NIXL)
            dev = rank % torch.cuda.device_count()
            self.cuda_dev = dev
            self.arena = torch.zeros(self.num_slots * slot_size // 2, dtype=torch.int16, device=f"cuda:{dev}")
            self.t.register(self.arena)
            base = self.arena.data_ptr()
            self._mem = lambda slot, n: Mem(base + slot * slot_size, n, "vram", dev)
            self.slot_tensors = [self.arena[s * slot_size // 2:(s + 1) * slot_size // 2] for s in range(self.num_slots)]
        else:
            self.t.register(pool)
            base = pool.base_address
            self._mem = lambda slot, n: Mem(base + slot * slot_size, n)
            self.slot_tensors = [torch.frombuffer(pool.slot_view(s), dtype=torch.int16) for s in range(self.num_slots)]
        gen = torch.Generator().manual_seed(0x5EED + rank)
        n16 = slot_size // 2
        self.base = torch.randint(-32768, 32767, (n16,), dtype=torch.int16, generator=gen).to(self.device)
        self.scratch = torch.empty(n16, dtype=torch.int16, device=self.device)
        # bookkeeping
        self.tracked: dict[int, _Req] = {}
        self.next_req = 1
        self.it = 0
        self.out_msgs: list = []
        self.mid_cancels: dict[int, list[int]] = {}  # iteration -> requests
        self.deferred_waiting: set[int] = set()
        self.c = dict(started=0, completed=0, cancelled=0, poisoned=0, finalized=0, checksum_ok=0,
                      checksum_errors=0, wedged=0, deferred=0, deferred_delivered=0, callbacks_untracked=0,
                      post_errors=0, refused_posts=0, reconnects=0, aborts_sent=0, aborts_received=0, bytes_verified=0,
                      bytes_completed=0,
                      live_at_loss=0, poisoned_after_loss=0, cancelled_after_loss=0, completed_after_loss=0,
                      poisoned_after_kill=0)
        self.poisoned_at: collections.deque[float] = collections.deque(maxlen=1 << 16)  # monotonic, at finalize
        self.cancel_results: dict[str, int] = {}
        self.checksum_failed: list[int] = []
        self.cancel_points: dict[str, int] = {}
        self.terminate_results: dict[str, int] = {}
        self.peer = ""
        self.peer_md = b""
        self.peer_lost = ""
        self.end_sent = self.end_received = self.ack_sent = self.ack_received = False
        self.disconnects_seen = 0
        self.offers_taken = 0  # offers (READ) or targets (WRITE) handed to _post: the reconnect's clock
        self.reconnect_after: int | None = None  # reconnect before the offer past this count (None: none pending)
        self.reload_peer = False  # the reconnect removes the peer first (a failed NIXL post: _post)
        self.corrupted = False
        self.t_start = time.monotonic()
        self.status_path = self.out / "status" / f"{self.name}.json"
        self._last_status = 0.0
        self._ppid = os.getppid()  # the launcher: when it is gone (SIGKILL), stop as at --deadline, not run on
        self.kill_asked = False  # kill-peer: this victim asked for its kill (once)

    # ---- setup ---------------------------------------------------------------------------------
    def connect(self, timeout: float = 60.0) -> None:
        md = self.t.metadata()
        self.chan.send([("hello", md)])
        deadline = time.monotonic() + timeout
        while True:
            for m in self.chan.recv_all():
                if m[0] == "hello":
                    self.peer_md = m[1]
                    self.peer = self.t.add_peer(self.peer_md)
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no metadata from the peer within {timeout}s")
            self.chan.wait(0.01)

    # ---- helpers -------------------------------------------------------------------------------
    def _slot(self, req: int) -> int:
        return self.engine.info(req).slot

    def _key(self, req: int) -> int:
        return ((req * 2654435761) >> 9) & 0x7FFF | 1

    def _fill(self, req: int, nbytes: int) -> None:
        n16 = nbytes // 2
        self.torch.bitwise_xor(self.base[:n16], self._key(req), out=self.slot_tensors[self._slot(req)][:n16])
        self._fence()

    def _fence(self) -> None:
        """Wait until the kernels that wrote the KV cache have finished.  On CUDA they only run once enqueued on
        the stream, and NIXL (UCX cuda_ipc / GPUDirect RDMA) reads the memory outside torch's stream order: an
        exposed slot (``expect``, shipped as an offer) or a posted WRITE could move the slot's previous bytes.
        Call it before exposing or posting memory a kernel wrote."""
        if self.cuda_dev is not None:
            self.torch.cuda.synchronize(self.cuda_dev)

    def _crc(self, t) -> int:
        if t.device.type != "cpu":
            t = t.cpu()
        return zlib.crc32(t.numpy().view("uint8"))

    def _verify(self, req: int, nbytes: int) -> bool:
        n16 = nbytes // 2
        got = self.slot_tensors[self._slot(req)][:n16]
        if self.opts.corrupt_one and not self.corrupted and self.rank == 0:
            got[n16 // 2] ^= 0x0100  # negative control: one flipped byte in one received cache
            self.corrupted = True
        # the KV view an executor would hand to attention: [blocks, layers, K/V, tokens, heads, dim]
        got.view(self.torch.float16).view(self.opts.kv.shape(nbytes // self.block_bytes, self.shards))
        self.torch.bitwise_xor(self.base[:n16], self._key(req), out=self.scratch[:n16])
        return self._crc(got) == self._crc(self.scratch[:n16])

    def _count(self, d: dict, k: str) -> None:
        d[k] = d.get(k, 0) + 1

    def _cancel(self, req: int, point: str | None) -> None:
        r = self.tracked[req]
        res = self.engine.cancel(req)
        self._count(self.cancel_results, res.value)
        if point:
            self._count(self.cancel_points, point)
        r.cancelled = True
        self._terminate(req)

    def _check(self, req: int) -> None:
        """Account a locally completed transfer once; the receiver verifies its checksum.  Runs before
        terminate: once terminated the slot may be leased again at once and overwritten."""
        r = self.tracked[req]
        if r.checked or r.terminate_called:
            return
        local = self.engine.outcome(req)
        if local is None or local.value != "completed":
            return
        r.checked = True
        self.c["bytes_completed"] += r.nbytes
        if self.role == "receiver":
            if self._verify(req, r.nbytes):
                self.c["checksum_ok"] += 1
                self.c["bytes_verified"] += r.nbytes
            else:
                self.c["checksum_errors"] += 1
                self.checksum_failed.append(req)

    def _terminate(self, req: int) -> None:
        r = self.tracked[req]
        if r.terminate_called:
            return
        self._check(req)
        r.terminate_called = True
        res = self.engine.terminate(req)
        self._count(self.terminate_results, res.value)
        # Where an executor that owns its KV blocks frees them: here when the answer is Terminated, and in
        # _on_terminate for a Deferred one, exactly once either way.  The demo's blocks are the engine's pool
        # slots, which the engine itself returns (or quarantines), so there is nothing to free by hand.  The
        # request leaves `tracked` before a deferred notice comes (callbacks_untracked counts them): an executor
        # keeps what its release needs (block ids) keyed by request until then, as deferred_waiting does here.
        if res.value == "Deferred":
            self.c["deferred"] += 1
            self.deferred_waiting.add(req)

    def _on_terminate(self, req: int) -> None:  # deferred termination notice (runs in poll): free its blocks here
        self.c["deferred_delivered"] += 1
        self.deferred_waiting.discard(req)
        if req not in self.tracked:
            self.c["callbacks_untracked"] += 1

    def _mine(self, plan: Plan, point: str) -> bool:
        return plan.cancel_side == self.role and plan.cancel_at == point

    def _expose_done(self, req: int) -> None:
        r = self.tracked[req]
        r.exposed_at = self.it
        if self._mine(r.plan, "mid_transfer"):
            self.mid_cancels.setdefault(self.it + r.plan.cancel_after, []).append(req)

    def _advertise(self, plan: Plan) -> _Req:
        nbytes = plan.blocks * self.block_bytes
        self.engine.advertise(plan.request, self.role, nbytes)
        r = _Req(plan, nbytes, time.monotonic())
        self.tracked[plan.request] = r
        self.c["started"] += 1
        return r

    def _post(self, req: int, remote: bytes) -> None:
        """Active side: READ (receiver) or WRITE (sender); a failed prepare leaves the session Advertised."""
        from .errors import IllegalTransition, PeerDisconnected, RoleRefused, TransportError

        self.offers_taken += 1
        if self.reconnect_after is not None and self.offers_taken > self.reconnect_after:
            self._reconnect()  # here, between two offers: a batch of offers read at once changes nothing
        r = self.tracked[req]
        r.active = True
        local = self._mem(self._slot(req), r.nbytes)
        op = self.t.read if self.role == "receiver" else self.t.write
        try:
            refused = self.engine.state(req).value != "Advertised"
            if refused:
                self._drop_offer(req, remote)  # cancelled first: this offer is never posted
            else:
                refused = op(req, local, self.peer, self.Offer.from_bytes(remote)) == "CancelledBeforePost"
        except IllegalTransition:
            refused = True
        except RoleRefused:
            # this side's own bug (DESIGN §9: the op against its session's role, or the offer's), never a
            # disconnect: reconnecting would hide it behind a retry, every time.  Fail loudly.
            raise
        except TransportError as e:
            # e.g. the peer was disconnected (injected: refused before the expose, so cancelling is evidence), or
            # the backend failed the post (the session is Poisoned already; the cancel changes nothing)
            self.c["post_errors"] += 1
            self._drop_offer(req, remote)
            self._cancel(req, None)
            self._abort_peer(req)
            # NIXL 1.5.1 takes the peer for disconnected after a failed post, and reloading its metadata alone
            # does not reconnect it: remove_peer() first (docs/nixl-notes.md)
            # (PeerDisconnected: an earlier post to it failed so; this one was refused before its expose)
            self.reload_peer = (self.reload_peer or getattr(e, "call", "") == "post_xfer_req"
                                or isinstance(e, PeerDisconnected))
            self._schedule_reconnect()
            return
        self._check_disconnects()  # (the post that rolls an injected disconnect counts it: see it now)
        if refused:
            # the peer cancelled first: its "stop" for this offer reached our transport, which skipped the
            # post (never posted: Quiesced(cancelled)).  Nothing moved: just release it.
            self.c["refused_posts"] += 1
            r.cancelled = True
            self._terminate(req)
            return
        self._expose_done(req)

    def _drop_offer(self, req: int, remote: bytes) -> None:
        """An offer this side will never post: its stop (sent or to come) needs no memory here."""
        if self.peer:
            self.t.forgo(req, self.peer, self.Offer.from_bytes(remote))

    def _abort_peer(self, req: int) -> None:
        self.out_msgs.append(("abort", req))
        self.c["aborts_sent"] += 1

    # ---- the sender's scheduler -------------------------------------------------------------------
    def _start_requests(self) -> None:
        if self.peer_lost or self.end_sent:
            n = 0
        else:
            free = self.engine.pool.stats()["free"]
            n = max(0, min(self.opts.concurrency - len(self.tracked), self.opts.requests + 1 - self.next_req, free))
        n = self.group.agree_count(n, site="demo:start")
        for _ in range(n):
            plan = self.plan[self.next_req - 1]
            self.next_req += 1
            r = self._advertise(plan)
            self._fill(plan.request, r.nbytes)  # "prefill": this request's KV blocks
            if self._mine(plan, "before_expose") and self.opts.mode == "read":
                self._cancel(plan.request, "before_expose")  # never exposed: no message to the peer
                continue
            if self.opts.mode == "read":
                offer = self.t.expect(plan.request, self.peer, self._mem(self._slot(plan.request), r.nbytes))
                self._expose_done(plan.request)  # exposed (and tagged) BEFORE the offer is shipped
                self.out_msgs.append(("offer", plan.request, offer.to_bytes()))
            else:
                self.out_msgs.append(("want", plan.request))

    # ---- control messages ------------------------------------------------------------------------
    def _handle(self, m: tuple) -> None:
        kind = m[0]
        if kind in ("offer", "target") and self._kill_due(m[1]):
            self._kill_here()
        if kind == "offer":  # receiver, READ mode
            _, req, desc = m
            r = self._advertise(self.plan[req - 1])
            if self._mine(r.plan, "before_expose"):
                self._drop_offer(req, desc)
                self._cancel(req, "before_expose")
                self._abort_peer(req)
            else:
                self._post(req, desc)
        elif kind == "want":  # receiver, WRITE mode
            _, req = m
            r = self._advertise(self.plan[req - 1])
            if self._mine(r.plan, "before_expose"):
                self._cancel(req, "before_expose")
                self._abort_peer(req)
            else:
                offer = self.t.expect(req, self.peer, self._mem(self._slot(req), r.nbytes))
                self._expose_done(req)
                self.out_msgs.append(("target", req, offer.to_bytes()))
        elif kind == "target":  # sender, WRITE mode
            _, req, desc = m
            if req not in self.tracked or self.tracked[req].cancelled:
                self._drop_offer(req, desc)
                self._abort_peer(req)  # we gave up already: release the receiver's exposed slot now
                return
            if self._mine(self.tracked[req].plan, "before_expose"):
                self._drop_offer(req, desc)
                self._cancel(req, "before_expose")
                self._abort_peer(req)
            else:
                self._post(req, desc)
        elif kind == "abort":  # the peer gave up on a request before exposing it
            _, req = m
            self.c["aborts_received"] += 1
            r = self.tracked.get(req)
            if r is not None and not r.cancelled:
                self._cancel(req, None)
        elif kind == "end":
            self.end_received = True
        elif kind == "end_ack":
            self.ack_received = True
        elif kind == "hello":  # a late duplicate (reconnect): fresh metadata
            self.peer_md = m[1]

    def _kill_due(self, req: int) -> bool:
        """kill-peer: is this worker the victim, and ``req``'s offer the kill point?  The first offer of a request
        past --kill-at of the run (request ids are in start order) that the survivor does not itself cancel in
        flight (its cancel, stopped in the same millisecond, raced the kill: the victim's transport acked it and
        the survivor's one exposed session, at --concurrency 1, ended Quiesced(cancelled), cut by nothing)."""
        o = self.opts
        if o.kill_at is None or self.kill_asked or self.rank != 0 or self.role != kill_victim(o.mode):
            return False
        plan = self.plan[req - 1]
        return req > o.kill_at * o.requests and not (plan.cancel_side == self.peer_role
                                                     and plan.cancel_at == "mid_transfer")

    def _kill_here(self) -> None:
        """kill-peer's kill, here: the offer in hand (the survivor's exposed session) is never posted.  The time
        written is the kill's (KILL_TIME_FILE, which the survivor reads; the launcher records the kill from it)."""
        import signal

        self.kill_asked = True
        # log what the engine queued up to here (records are logged at poll): a victim killed within its first
        # batch of offers, before any poll (READ, --concurrency 256, --kill-at 0.7 of 300), left an empty log,
        # and the audit of the killed process's log failed with no_events
        self.engine.poll()
        now = time.monotonic()
        self._status(now)  # (the launcher's table of a killed side: its last status)
        _atomic_json(self.out / "status" / KILL_TIME_FILE, {"victim": self.name, "t_mono": now})
        os.kill(os.getpid(), signal.SIGKILL)

    def _lose_peer(self, why: str) -> None:
        """The peer process is gone: no evidence can come from it any more."""
        if self.peer_lost:
            return
        self.peer_lost = why
        self.c["live_at_loss"] = len(self.tracked)
        self.engine.set_backend_health(False, f"peer {self.peer_role}-{self.rank} lost: {why}")
        if self.peer:
            self.t.remove_peer(self.peer)  # its unfinished sessions here fail -> Poisoned
        for req, r in list(self.tracked.items()):
            if not r.cancelled and self.engine.state(req).value == "Advertised":
                self._cancel(req, None)  # never exposed: cancelling is evidence
            else:
                self._terminate(req)
        self.end_received = self.ack_received = True

    # ---- finalization --------------------------------------------------------------------------
    def _finalize(self, req: int, completed_all: bool, failed_any: bool) -> None:
        r = self.tracked[req]
        self._check(req)
        if self._mine(r.plan, "after_completion") and not r.cancelled:
            self._cancel(req, "after_completion")  # AlreadyComplete: idempotent, frees nothing twice
        else:
            self._terminate(req)
        del self.tracked[req]
        outcome = "poisoned" if failed_any else "completed" if completed_all else "cancelled"
        self.c[outcome] += 1
        if failed_any:
            self.poisoned_at.append(time.monotonic())
        if self.peer_lost:
            self.c[f"{outcome}_after_loss"] += 1
        self.c["finalized"] += 1
        if time.monotonic() - r.t0 > self.opts.wedge_bound:
            self.c["wedged"] += 1

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        from .collectives import poll_symmetric

        deadline = self.t_start + self.opts.deadline
        while True:
            self.it += 1
            busy = False
            try:
                msgs = self.chan.recv_all()
            except PeerLost as exc:
                msgs = []
                self._lose_peer(str(exc))
            for m in msgs:
                self._handle(m)
            busy |= bool(msgs)
            if self.role == "sender":  # every iteration on every rank: it makes a collective
                before = self.next_req
                self._start_requests()
                busy |= self.next_req != before
            for req in self.mid_cancels.pop(self.it, ()):
                r = self.tracked.get(req)
                if r is not None and not r.cancelled:
                    self._cancel(req, "mid_transfer")
            dec = poll_symmetric(self.engine, self.group, list(self.tracked))
            for req in sorted(dec.failed - dec.terminal):
                r = self.tracked.get(req)
                if r is not None and not r.cancelled and self.engine.state(req).value not in ("Quiesced", "Poisoned", "Terminated"):
                    self._cancel(req, None)  # failed on another rank: stop this rank's shard too
            for req in sorted(dec.terminal):  # Quiesced or Poisoned on every rank (poisoned: quarantined somewhere)
                self._finalize(req, req in dec.completed, req in dec.poisoned)
                busy = True
            # end of run: the sender announces it has nothing left; the receiver acknowledges when done
            if self.role == "sender" and not self.end_sent and self.next_req > self.opts.requests and not self.tracked:
                self.out_msgs.append(("end",))
                self.end_sent = True
            if self.role == "receiver" and self.end_received and not self.tracked and not self.ack_sent:
                self.out_msgs.append(("end_ack",))
                self.ack_sent = True
            if self.out_msgs and not self.peer_lost:
                try:
                    self.chan.send(self.out_msgs)
                except PeerLost as exc:
                    self._lose_peer(str(exc))
            self.out_msgs = []
            now = time.monotonic()
            if now - self._last_status > 0.05:  # the launcher's kill-peer acts on it: keep it fresh
                self._status(now)
            local_done = not self.tracked and (self.ack_received if self.role == "sender" else self.ack_sent)
            if local_done and self.reconnect_after is not None and not self.peer_lost:
                # a reconnect still pending (a post failed on one of the last requests) is made now: NIXL's mark
                # on the peer stays a health reason until remove_peer(), and the run would end unhealthy
                self._reconnect()
            timed_out = now > deadline or os.getppid() != self._ppid
            if self.group.all_ranks(local_done or timed_out, site="demo:done"):
                break
            if not busy:
                self.chan.wait(0.0005) if self.tracked else self.chan.wait(0.002)
        return self._finish()

    def _check_disconnects(self) -> None:
        """After a post: did it roll an injected disconnect?  (Counted at the post, in this thread: until session 30
        the loop read the counter every 8 iterations and reconnected 20 ms later, so which requests a disconnect
        refused followed the clock, and a failing seed did not replay them.)"""
        if self.faults is None or not self.faults.disconnect:
            return
        n = self.t.fault_stats()["disconnects"]
        if n > self.disconnects_seen:
            self.disconnects_seen = n
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        # (a post's TransportError schedules one too, with or without injected faults: a real disconnect had waited
        # for a reconnect that only the fault counter's branch made)
        if self.reconnect_after is None:
            self.reconnect_after = self.offers_taken + RECONNECT_AFTER_OFFERS

    def _reconnect(self) -> None:
        self.reconnect_after = None
        if self.peer_lost:  # (its remove_peer came with the loss)
            return
        if self.reload_peer:  # (its unfinished sessions here fail: Poisoned, safe)
            self.t.remove_peer(self.peer)
            self.reload_peer = False
        self.t.add_peer(self.peer_md)  # reconnect: reload the peer's metadata (a fresh connection)
        self.c["reconnects"] += 1

    def _status(self, now: float) -> None:
        self._last_status = now
        h = self.engine.health()
        st = dict(self.c, name=self.name, role=self.role, rank=self.rank, tracked=len(self.tracked),
                  elapsed=now - self.t_start, healthy=h.healthy, reasons=list(h.reasons), pid=os.getpid(),
                  peer_lost=self.peer_lost)
        _atomic_json(self.status_path, st)

    def _finish(self) -> dict:
        self._status(time.monotonic())
        wedged_open = len(self.tracked)
        # let deferred notices and in-flight late events settle (bounded)
        end = time.monotonic() + 3.0
        while self.deferred_waiting and time.monotonic() < end:
            self.engine.drain(0.01)
        self.t.wait_idle(1.0 if self.peer_lost else 3.0)
        self.engine.poll()
        if self.peer_lost:  # the launcher's kill-peer: sessions Poisoned since the kill (KILL_TIME_FILE)
            kill = _read_json(self.out / "status" / KILL_TIME_FILE)
            if kill is not None and isinstance(kill.get("t_mono"), (int, float)):
                self.c["poisoned_after_kill"] = sum(1 for t in self.poisoned_at if t >= kill["t_mono"])
        tstats = self.t.stats()
        pool = self.engine.pool.stats()
        stats = self.engine.statistics()
        h = self.engine.health()
        live = self.engine.live_sessions()
        expected_quarantine = stats.quarantined - stats.recovered
        # stops the transport still remembers wait for a session of ours that will never come: a leak
        remembered = tstats.remembered_stops
        leaked = (live + pool["leased"] + abs(pool["quarantined"] - expected_quarantine) + len(self.deferred_waiting)
                  + remembered)
        elapsed = time.monotonic() - self.t_start
        summary = dict(
            name=self.name, role=self.role, rank=self.rank, shards=self.shards, mode=self.opts.mode,
            device=self.device, pid=os.getpid(), elapsed_s=elapsed, **self.c,
            wedged_open=wedged_open, wedged_total=self.c["wedged"] + wedged_open,
            cancel_results=self.cancel_results, cancel_points=self.cancel_points,
            terminate_results=self.terminate_results,
            leak=dict(live_sessions=live, leased=pool["leased"], quarantined=pool["quarantined"],
                      expected_quarantined=expected_quarantine, deferred_undelivered=len(self.deferred_waiting),
                      remembered_stops=remembered, leaked=leaked),
            pool=pool,
            engine=dict(transitions=stats.transitions, illegal=stats.illegal, late=stats.late,
                        timeouts=stats.timeouts, grace_expired=stats.grace_expired,
                        quarantined=stats.quarantined, recovered=stats.recovered),
            health=dict(healthy=h.healthy, reasons=list(h.reasons), backend_reason=h.backend_reason,
                        quarantined=h.quarantined, quarantine_budget=h.quarantine_budget,
                        counts={k.value: v for k, v in h.counts.items()}),
            transport=dict(active=tstats.active, passive=tstats.passive, live_xfers=tstats.live_xfers,
                           posted=tstats.posted, completed=tstats.completed, failed=tstats.failed,
                           stops_sent=tstats.stops_sent, quiesced_received=tstats.quiesced_received,
                           peer_stops=tstats.peer_stops, abandoned=tstats.abandoned,
                           unsafe_releases=tstats.unsafe_releases, late_evidence=tstats.late_evidence,
                           stops_resent=tstats.stops_resent, resends_pending=tstats.resends_pending),
            faults=self.t.fault_stats(),
            peer_lost=self.peer_lost, checksum_failed=self.checksum_failed[:20],
        )
        self.t.stop()
        _atomic_json(self.out / "workers" / f"{self.name}.json", summary)
        self._status(time.monotonic())
        return summary


# ---- entry points --------------------------------------------------------------------------------
def _prepare_dirs(out: Path) -> None:
    for d in ("logs", "status", "workers"):
        (out / d).mkdir(parents=True, exist_ok=True)


def run_pipe_worker(role: str, opts_json: str, conn) -> None:
    """Single-rank worker (multiprocessing spawn target): control channel = a Pipe to the peer."""
    import signal

    # Ctrl-C reaches the whole foreground process group: the launcher stops the workers (each printed a
    # KeyboardInterrupt traceback of its own)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    opts = DemoOptions.from_json(opts_json)
    out = Path(opts.out)
    _prepare_dirs(out)
    configure_logging(out / "logs" / f"{role}-0.jsonl")
    try:
        w = Worker(role, opts, 0, 1, PipeChannel(conn), SoloGroup())
        try:
            w.connect()
        except PeerLost as exc:
            w._lose_peer(str(exc))
        w.run()
    except BaseException:
        import traceback

        (out / "workers" / f"{role}-0.error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        raise


def main(argv: list[str] | None = None) -> int:
    """MPI entry point: ``mpiexec -n 2K python -m lifecycle.demo_worker --opts JSON``.

    World ranks [0, K) are the sender (context) group, [K, 2K) the receiver (generation) group;
    ``comm.Split`` makes one communicator per side, and sender rank i pairs with receiver rank i.
    """
    p = argparse.ArgumentParser(prog="python -m lifecycle.demo_worker")
    p.add_argument("--opts", required=True, help="DemoOptions as JSON (written by `lifecycle demo`)")
    a = p.parse_args(argv)
    try:
        opts = DemoOptions.from_json(Path(a.opts).read_text(encoding="utf-8") if not a.opts.lstrip().startswith("{")
                                     else a.opts)
    except (OSError, UnicodeError, ValueError) as exc:  # (InvalidArgument is a ValueError)
        print(f"demo_worker: --opts {a.opts!r:.200}: {exc}", file=sys.stderr)
        return 2
    from mpi4py import MPI

    from .collectives import RankGroup

    world = MPI.COMM_WORLD
    size, wrank = world.Get_size(), world.Get_rank()
    if size % 2 or size < 2:
        print("demo_worker: needs an even number of MPI ranks (K senders + K receivers)", file=sys.stderr)
        return 2
    k = size // 2
    role = "sender" if wrank < k else "receiver"
    side = world.Split(0 if role == "sender" else 1, wrank)
    rank = side.Get_rank()
    out = Path(opts.out)
    _prepare_dirs(out)
    configure_logging(out / "logs" / f"{role}-{rank}.jsonl")
    group = RankGroup(side, watchdog=max(30.0, opts.deadline))
    chan = MpiChannel(world, wrank + k if role == "sender" else wrank - k)
    w = Worker(role, opts, rank, k, chan, group)
    w.connect()
    w.run()
    chan.close()
    group.close()
    side.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
