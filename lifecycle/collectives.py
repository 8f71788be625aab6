"""Rank-symmetric collectives for tensor/pipeline-parallel executors, with a ledger and a watchdog.

Theory of operation
-------------------
Executors that run one process per TP rank make collective calls from code that is *supposed* to be
rank-symmetric.  The seed bugs (DESIGN.md §8) show how it breaks: a collective gated on a rank-local
value (one rank enters, the others skip: a hang), and conditional gathers on per-rank-divergent
paths (the next collective receives another call's payload: a crash far away from the cause).

Every call through a :class:`RankGroup` is one *logical collective* with a sequence number.  Each one
starts with the same MPI operation on every rank -- a non-blocking ``Allreduce(MAX)`` (one persistent
``Allreduce_init`` request, started per call) of a fixed 8-slot int64 *header*::

    [fp, -fp, seq, -seq, p0, p1, p2, p3]

``fp`` is a 62-bit hash of the fingerprint (call site ``file:line:function`` of the first caller
outside this module, op name, payload kind, payload size when it must match); ``seq`` is the
sequence number.  With MAX, ``recv[0] == -recv[1]`` iff every rank sent the same fingerprint, and the
same for ``seq``.  The slots ``p0..p3`` carry small payloads folded into the same reduction (an OR is
a MAX, an AND or a min is a MAX of negated values), so ``any_rank`` / ``all_ranks`` / ``agree_count``
cost exactly one 64-byte allreduce, ledger included.

Because *every* helper begins with that identical header exchange, ranks that diverged (different
op, different call site, one rank in a loop that the others left) meet in the header exchange and
see the mismatch before any payload moves: divergent calls never mis-pair silently where their (seq, site, op,
kind, size) differ.  (Calls alike in all five, a per-item loop that is each iteration's only collective run a
different number of times per iteration, do pair across iterations: a symmetric end-of-iteration call exposes
them, agree_count prevents them; docs/collectives.md.)  On a
mismatch every rank (they all got the same reduced header) runs one extra gather of the full
fingerprints and raises :class:`CollectiveDesyncError` naming the sequence number, the field that
differs and each rank's call site.  Payload phases (``flush``, ``allgather_ints``,
``allreduce_ints``) follow only after the header agreed, so they pair by construction.

The group works on its own duplicate of the communicator, so its traffic never pairs with raw
collectives the application makes on the communicator it passed in.

Watchdog: every MPI request is polled (``Test`` with a spin-then-sleep backoff, so oversubscribed
ranks make progress) against a deadline of ``watchdog`` seconds.  A rank that has waited longer than
``announce_after`` sends one small *arrival notice* ``(seq, phase, site)`` to every other rank on a
second duplicate communicator (point-to-point, so it needs no cooperation from absent ranks).  Fast
collectives never announce, so this costs nothing on the hot path.  When the deadline passes a rank
keeps polling for a short grace period (long enough for every rank that arrived before the deadline
to have announced), then raises :class:`CollectiveTimeoutError` naming the ranks that never arrived.
Their last completed step is known without asking them: a completed allreduce/allgather means
every rank contributed, so an absent rank's last completed step is this rank's last completed step
(sequence number and call site, which the ledger verified to be identical on all ranks).

After either error (or an exception from outside inside a wait) the group is *broken*: a timed-out
request can never be cancelled in MPI, so every later call raises again; the application should log
and :meth:`RankGroup.abort` the job.

Rules these helpers enforce (DESIGN.md §8): (a) gate collectives on ``any_rank(local_flag)``, never
on a local value, and let ranks with nothing to do join with an empty contribution; (b) ``push``
per-rank payloads anywhere, ``flush`` at a point every rank reaches every iteration (it always
participates, even empty); (c) agree on a count (``agree_count``, a min-reduce) before processing
"what is ready".  :func:`poll_symmetric` applies the consensus rules to engine states.
"""

from __future__ import annotations

import array
import hashlib
import io
import os
import pickle
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from . import logstream
from .errors import CollectiveDesyncError, CollectiveTimeoutError, InvalidArgument, _shown


__all__ = [
    "CollectiveDesyncError",
    "CollectiveTimeoutError",
    "Fingerprint",
    "GroupStatistics",
    "RankGroup",
    "SymmetricDecisions",
    "poll_symmetric",
]

log = structlog.get_logger(__name__)

_HEADER = 8
_ERROR = 40  # logging.ERROR, the level of lifecycle.collective_desync
_FP_MASK = (1 << 62) - 1  # a 62-bit hash never overflows when negated in int64
_TAG_ARRIVAL = 7
_FIELDS = ("seq", "op", "site", "kind", "size")  # priority order of the reported differing field
_INVALID_SIZE = -2  # the declared size of allreduce_ints values that are not int64 (no rank has it)
_DRAIN_EVERY = 64  # collectives between two reads of the arrival notices (a rank that never waits long)
_FP_CACHE_MAX = 4096  # fingerprint hashes kept (sites that vary per call would grow it without bound)
# A gather whose receive buffer is larger than this first agrees that every rank allocated it (and a flush that
# big agrees after decoding): the one allocation sized by the *other* ranks' payloads, so the one that fails on
# some ranks only.  Below it a MemoryError is no more this payload's than any other allocation's.
_AGREE_BYTES = 1 << 20
_CAUSE_BYTES = 256  # a rank's record in a failure agreement: a flag, then its cause (UTF-8, cut)


@dataclass(frozen=True)
class Fingerprint:
    """What one rank declared for one logical collective (the ledger entry)."""

    seq: int
    site: str  # "file:line:function" of the first caller outside this module
    op: str
    kind: str
    size: int  # -1 where per-rank sizes legitimately differ (flush, allgather_ints)

    def __str__(self) -> str:
        size = "[invalid values]" if self.size == _INVALID_SIZE else "" if self.size < 0 else f"[{self.size}]"
        return f"#{self.seq} {self.op}({self.kind}{size}) at {self.site}"


def _desync_error(seq_no: int, field: str, fingerprints: dict[int, Fingerprint], rank: int) -> Any:
    """CollectiveDesyncError with the whole ledger entry of every rank.

    Attributes: ``seq_no``, ``field`` (first differing field in the order seq, op, site, kind, size),
    ``fields`` (all differing fields), ``sites`` (rank -> "file:line:function"), ``fingerprints``
    (rank -> Fingerprint), ``rank`` (the rank that raised it).
    """
    per_rank = "; ".join(f"rank {r}: {fp}" for r, fp in sorted(fingerprints.items()))
    err = CollectiveDesyncError(
        f"collective desync at seq {seq_no}: field {field!r} differs (seen on rank {rank}); {per_rank}",
        seq_no=seq_no,
        field=field,
        sites={r: fp.site for r, fp in fingerprints.items()},
    )
    err.fields = tuple(f for f in _FIELDS if len({getattr(p, f) for p in fingerprints.values()}) > 1)
    err.fingerprints = dict(fingerprints)
    err.rank = rank
    return err


def _timeout_error(
    seq_no: int,
    site: str,
    op: str,
    rank: int,
    missing: tuple[int, ...],
    arrived: dict[int, str],
    last_completed: tuple[int, str] | None,
    waited: float,
) -> Any:
    """CollectiveTimeoutError raised on the ranks that arrived.

    Attributes: ``seq_no``, ``field`` ("arrival"), ``missing`` (absent rank -> its last completed
    (seq, site), or None when no collective ever completed), ``last_completed`` (same mapping),
    ``arrived`` / ``sites`` (rank -> the site it announced, this rank included), ``site``, ``op``,
    ``rank``, ``waited`` (seconds).
    """
    where = (
        "no collective completed before"
        if last_completed is None
        else f"last completed seq {last_completed[0]} at {last_completed[1]}"
    )
    who = ", ".join(map(str, missing)) if missing else "none (all announced; MPI did not complete)"
    err = CollectiveTimeoutError(
        f"collective timeout at seq {seq_no} ({op} at {site}) on rank {rank} after {waited:.1f}s: "
        f"ranks never arrived: {who}; {where}",
        seq_no=seq_no,
        missing={r: last_completed for r in missing},
        sites=dict(arrived),
    )
    err.last_completed = {r: last_completed for r in missing}
    err.arrived = dict(arrived)
    err.site, err.op, err.rank, err.waited = site, op, rank, waited
    return err


@dataclass(frozen=True)
class GroupStatistics:
    """An immutable snapshot of a group's counters."""

    rank: int
    size: int
    seq: int  # Invariant: equal on every rank between collectives (the ledger checks it)
    collectives: int
    slow_waits: int  # waits that outlived announce_after and sent arrival notices
    buffered: int  # payloads pushed and not yet flushed
    broken: bool


def _common_fields() -> dict[str, Any]:
    """The keys every lifecycle event carries (schemas/events.schema.json), from the process's one event stream
    (the engine's too).  The table and schema id come from the pure-Python spec and audit (equal to the core's,
    tested), imported lazily (error path only), so this module never needs the compiled core: without it
    (tests/mpi load it that way) it had emitted pid and time only, lines the audit calls malformed."""
    global _table_ids
    if _table_ids is None:
        from . import audit, spec

        _table_ids = (spec.load_default().digest, audit.SCHEMA_ID)
    stream = logstream.current
    return {  # no `engine` key: not an engine's event
        "t_mono_ns": time.monotonic_ns(),
        "seq": next(stream.seq),
        "pid": stream.pid,
        "proc": stream.proc,
        "table": _table_ids[0],
        "schema": _table_ids[1],
    }


_table_ids: tuple[str, str] | None = None  # (table digest, schema id), read once


def _mpi() -> Any:
    from mpi4py import MPI  # lazy: the package imports without the optional mpi extra

    return MPI


_site_cache: dict[tuple[Any, int], str] = {}


def _call_site() -> str:
    """``file:line:function`` of the innermost frame outside this module (cached per code+line)."""
    return _site_from(sys._getframe(2))


def _site_from(f: Any) -> str:
    """``file:line:function`` of ``f`` or, where ``f`` is in this module, of the first caller outside it."""
    while f is not None and f.f_code.co_filename == __file__:
        f = f.f_back  # type: ignore[assignment]
    if f is None:  # pragma: no cover - called from this module's top level
        return "<unknown>:0:<unknown>"
    key = (f.f_code, f.f_lineno)
    site = _site_cache.get(key)
    if site is None:
        # basename: ranks on different hosts may install the package under different paths
        site = f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}:{f.f_code.co_name}"
        _site_cache[key] = site
    return site


def _check_seconds(name: str, v: Any, *, positive: bool) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if positive else v >= 0) or v > 1e9:
        raise InvalidArgument(name, f"expected seconds in {'(0' if positive else '[0'}, 1e9], got {_shown(v):.40}")


def _check_site(site: Any) -> str | None:
    """None when ``site`` is usable (None or a str); else what is wrong with it (a list raised a bare
    TypeError while hashing the fingerprint, on that rank alone)."""
    if site is None or isinstance(site, str):
        return None
    return f"expected a str or None, got {type(site).__name__} {_shown(site):.40}"


def _check_comm(parent: Any, MPI: Any) -> None:
    """InvalidArgument unless ``parent`` is an intracommunicator.  Over an intercommunicator every reduction
    and gather returns the *remote* group's contributions (MPI's intercommunicator semantics): any_rank(True)
    answered False on the rank that passed it, and poll_symmetric decided from the other group's engines,
    with no error.  A str or COMM_NULL raised a bare AttributeError or a raw MPI error.  Every rank passes the
    same kind of communicator, so each refuses it locally, before any collective."""
    if not isinstance(parent, MPI.Comm) or parent == MPI.COMM_NULL:
        raise InvalidArgument("comm", f"expected an mpi4py intracommunicator, got {type(parent).__name__} "
                                      f"{_shown(parent):.40}")
    if parent.Is_inter():
        raise InvalidArgument("comm", "an intercommunicator reduces over the remote group, not this one; pass "
                                      "an intracommunicator (Intercomm.Merge() makes one)")


def _int64_values(values: Any) -> np.ndarray:
    """``values`` as a flat int64 array, or TypeError/ValueError/OverflowError naming what is wrong (or the error
    that converting ``values`` raised: an ``__array__`` may raise anything).

    Strict: only integers (and bools) that fit int64.  ``np.ascontiguousarray(dtype=int64)`` alone
    truncated floats (1.7 -> 1), turned NaN and 1e30 into -2**63, wrapped uint64 2**64-1 to -1 and
    parsed '12': wrong sums with no error.
    """
    arr = np.asarray(values)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    kind = arr.dtype.kind
    if kind == "u" and int(arr.max()) >= 1 << 63:
        raise OverflowError(f"{int(arr.max())} does not fit int64")
    if kind == "O":
        flat = arr.reshape(-1).tolist()
        for v in flat:
            if not isinstance(v, (int, np.integer)):
                raise TypeError(f"expected integers, got {type(v).__name__} {_shown(v):.40}")
        arr = np.array(flat, dtype=np.int64)  # OverflowError past int64
    elif kind not in "biu":
        raise TypeError(f"expected integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)


def _truth(name: str, flag: Any) -> tuple[int, InvalidArgument | None]:
    """``(int(bool(flag)), None)``, or ``(0, InvalidArgument)`` where ``flag`` has no truth value (a numpy
    array of several items): the rank joins as False, and every rank raises (RankGroup._refuse_bad_input)."""
    try:
        return int(bool(flag)), None
    except Exception as exc:
        err = InvalidArgument(name, f"expected a truth value, got {type(flag).__name__} ({exc})")
        err.__cause__ = exc
        return 0, err


class _InvalidValues(Exception):
    """Internal: some ranks' allreduce_ints values were not int64 (every rank raises InvalidArgument)."""


def _unpickle_all(blobs: list[np.ndarray]) -> tuple[list[Any], dict[int, BaseException]]:
    """Each rank's payload list, None where it failed to unpickle (rank -> the exception)."""
    out: list[Any] = []
    failed: dict[int, BaseException] = {}
    for r, b in enumerate(blobs):
        if not b.size:
            out.append([])
            continue
        try:
            out.append(pickle.loads(b.tobytes()))
        except Exception as exc:
            failed[r] = exc
            out.append(None)
    return out, failed


class _Pickler(pickle.Pickler):
    """Notes whether a payload holds anything but builtin scalars and containers: the C pickler calls
    ``reducer_override`` for every other object only (instances of classes, classes, functions, numpy arrays,
    subclasses of the builtins), whose unpickling imports or calls something that may fail on another rank (a
    class only some ranks can import).  A plain payload unpickles wherever it pickled, memory permitting."""

    plain = True

    def reducer_override(self, obj: Any) -> Any:
        self.plain = False
        return NotImplemented


def _cause(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, never an error itself (its ``__str__`` may raise)."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its str() raised)"


class _GatherFailed(Exception):
    """Internal: some ranks could not allocate a gather's receive buffer; every rank raises it, in step."""

    def __init__(self, failed: dict[int, str], nbytes: int, local: BaseException | None):
        self.failed, self.local = failed, local  # local: this rank's own error (None where it allocated)
        causes = "; ".join(f"rank {r}: {c}" for r, c in sorted(failed.items()))
        super().__init__(f"rank(s) {sorted(failed)} could not allocate the {nbytes}-byte receive buffer ({causes})")


class RankGroup:
    """Rank-symmetric collectives over an MPI intracommunicator, with a ledger and a watchdog.

    Every method is a collective: every rank of ``comm`` must call the same methods, in the same
    order, from the same call sites (``site=`` overrides the site for code that is symmetric by
    design but lives on different lines).
    """

    def __init__(
        self,
        comm: Any = None,
        *,
        watchdog: float = 30.0,
        ledger: bool = True,
        announce_after: float | None = None,
        spin: float = 200e-6,
    ):
        _check_seconds("watchdog", watchdog, positive=True)
        _check_seconds("spin", spin, positive=False)
        if announce_after is not None:
            _check_seconds("announce_after", announce_after, positive=False)
        # both bound a wait inside the watchdog: a spin of 8 s against a 1 s watchdog timed out after 8 s
        if spin >= watchdog:
            raise InvalidArgument("spin", f"must be less than watchdog ({watchdog!r:.40}), got {spin!r:.40}")
        if announce_after is not None and announce_after >= watchdog:
            raise InvalidArgument("announce_after",
                                  f"must be less than watchdog ({watchdog!r:.40}), got {announce_after!r:.40}")
        MPI = _mpi()
        self._MPI = MPI
        parent = MPI.COMM_WORLD if comm is None else comm
        _check_comm(parent, MPI)
        self.watchdog = float(watchdog)
        site = _call_site()
        # Non-blocking duplicates under the watchdog: a rank that raised before (or never reached) this
        # constructor left the others in a blocking Dup for good.  Collectives: never pair with the
        # application's own calls; the side one carries arrival notices (point-to-point).
        self._comm, self._side = self._dup(parent, site)
        self.rank: int = self._comm.Get_rank()
        self.size: int = self._comm.Get_size()
        self.ledger = bool(ledger)
        self.spin = float(spin)  # seconds of busy polling before a wait starts yielding the core
        self.announce_after = (
            min(0.1, self.watchdog / 10) if announce_after is None else float(announce_after)
        )
        self._grace = 2 * self.announce_after + 0.25
        self._seq = 0
        self._collectives = 0
        self._slow_waits = 0
        self._phase = 0
        self._last_seq = -1  # the last completed logical collective (verified identical on all ranks)
        self._last_site = ""
        self._broken: Exception | None = None
        self._closed = False
        self._buffer: list[Any] = []
        self._fp_cache: dict[tuple[str, str, str, int], int] = {}
        self._site = ""
        self._op = ""
        self._kind = ""
        self._size_decl = -1
        # the header exchange is one persistent collective (MPI 4): Start/Test, no per-call setup
        self._send = array.array("q", bytes(8 * _HEADER))
        self._recv = array.array("q", bytes(8 * _HEADER))
        self._hreq = self._comm.Allreduce_init(self._send, self._recv, MPI.MAX)
        self._arrivals: dict[int, tuple[int, int, str]] = {}
        self._pending_sends: list[tuple[Any, bytes]] = []
        self._status = MPI.Status()
        self._open = False  # a logical collective began and has not finished (see _header)
        # The ranks agree on the ledger setting (outside the sequence): a rank without it sends no
        # fingerprint, so only the ledger ranks saw a "mismatch" and the others went on alone.
        self._site, self._op, self._kind = site, "RankGroup", "none"
        send = self._send
        send[4], send[5] = int(self.ledger), -int(self.ledger)
        # announced as seq -1 (before the first collective): as (0, 0), a rank that waited here and then never
        # came to the first collective counted as arrived there (its old notice), and no rank was named missing
        self._seq = -1
        self._hreq.Start()
        self._wait(self._hreq)
        self._seq = 0
        if self._recv[4] != -self._recv[5]:
            self._free()  # not close(): its ledger-checked exchange needs the ranks to agree on the ledger
            raise InvalidArgument("ledger", f"ranks disagree: ledger={self.ledger} on rank {self.rank}, the "
                                            "opposite on another (every rank must pass the same)")

    def _dup(self, parent: Any, site: str) -> tuple[Any, Any]:
        MPI = self._MPI
        comms, reqs = zip(*(parent.Idup() for _ in range(2)))
        start = time.monotonic()
        nap = 0.0
        while not MPI.Request.Testall(list(reqs)):
            waited = time.monotonic() - start
            if waited > self.watchdog:
                raise CollectiveTimeoutError(
                    f"collective timeout in RankGroup() at {site} on rank {parent.Get_rank()} after "
                    f"{waited:.1f}s: not every rank of the communicator constructed the group",
                    seq_no=-1, missing={}, sites={parent.Get_rank(): site})
            nap = min(1e-3, nap * 2 + 1e-6) if waited > 2e-3 else 0.0
            time.sleep(nap)
        return comms[0], comms[1]

    # ------------------------------------------------------------------ public collectives

    def any_rank(self, flag: bool, *, site: str | None = None) -> bool:
        """OR over ranks. Gate a collective on this, never on a rank-local value."""
        v, bad = _truth("flag", flag)
        hdr = self._header("any_rank", "bool", 1, site, v, int(bad is not None))
        self._refuse_bad_input(hdr, bad, "flag", "a flag with no truth value", "decided")
        self._done()
        return bool(hdr[4] > 0)

    def all_ranks(self, flag: bool, *, site: str | None = None) -> bool:
        """AND over ranks."""
        v, bad = _truth("flag", flag)
        hdr = self._header("all_ranks", "bool", 1, site, -v, int(bad is not None))
        self._refuse_bad_input(hdr, bad, "flag", "a flag with no truth value", "decided")
        self._done()
        return bool(-hdr[4] == 1)

    def agree_count(self, n: int, *, site: str | None = None) -> int:
        """The minimum of ``n`` over ranks (a min-reduce, not a rank-0 broadcast).

        Every rank gets the same count and no rank is asked to process more items than it has
        ready; items beyond the count stay for a later iteration.
        """
        bad = None
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= int(n) < 1 << 63:
            # still joins (as 0), then every rank raises: never strands the others
            bad = InvalidArgument("n", f"expected a count in [0, 2**63), got {_shown(n):.40}")
            n = 0
        hdr = self._header("agree_count", "int", 1, site, -int(n), int(bad is not None))
        self._refuse_bad_input(hdr, bad, "n", "a count not in [0, 2**63)", "agreed")
        self._done()
        return int(-hdr[4])

    def barrier(self, *, site: str | None = None) -> None:
        """A ledger-checked barrier (a header exchange with no payload)."""
        self._header("barrier", "none", 0, site, 0, 0)
        self._done()

    def allreduce_ints(
        self, values: Sequence[int] | np.ndarray, op: str = "sum", *, site: str | None = None
    ) -> np.ndarray:
        """Element-wise ``sum`` / ``max`` / ``min`` of an int64 array; its length is in the ledger.  A sum past
        int64 raises InvalidArgument("values") on every rank (never wraps)."""
        MPI = self._MPI
        ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        # (an op that is not a str is in the kind by its type: an object whose str() is "sum" on one rank, the
        # str on the others, passed the ledger; that rank then raised before the reduction, stranding the others)
        kind = f"int64:{str.__str__(op):.40}" if isinstance(op, str) else f"int64:<{type(op).__name__:.40}>"
        bad: Exception | None = None
        try:
            send = _int64_values(values)
        except Exception as exc:  # any: values whose __array__ raises (a torch tensor that requires grad) too
            bad, send = exc, np.empty(0, dtype=np.int64)
        # A rank with values that are not int64 joins declaring a size no rank can have.  Every rank sees the
        # sizes differ in the header and gathers the fingerprints; where only this sentinel differs, every rank
        # raises InvalidArgument naming the ranks with bad values, and the group stays usable (_desync).
        # Without the ledger (no fingerprints) p1 says the same, as for the other collectives (_refuse_bad_input).
        # The op is in the ledger's kind: a rank whose op differs is a desync on every rank; the same bad op on
        # every rank raises on every rank, after the header (never stranding one).
        try:
            hdr = self._header("allreduce_ints", kind, _INVALID_SIZE if bad is not None else int(send.size), site,
                               0, int(bad is not None))
        except _InvalidValues as iv:
            raise InvalidArgument("values", str(iv) if bad is None else f"{iv}; this rank's: {bad}") from bad
        self._refuse_bad_input(hdr, bad, "values", "values that are not int64", "reduced")
        if not (isinstance(op, str) and op in ops):
            self._done()
            raise InvalidArgument("op", f"expected one of {sorted(ops)}, got {_shown(op):.40}")
        if op != "sum":
            recv = np.empty_like(send)
            self._wait(self._comm.Iallreduce(send, recv, ops[op]))
            self._done()
            return recv
        # MPI's int64 SUM wraps silently on overflow.  Summed as two halves instead, each with room for 2**31
        # ranks (low: 32 bits >= 0; high: the rest, signed), and put together exactly: a sum past int64 is
        # found on every rank alike (every rank gets the same halves), which raises, the group usable.
        halves = np.concatenate((send & 0xFFFFFFFF, send >> 32))
        got = np.empty_like(halves)
        self._wait(self._comm.Iallreduce(halves, got, MPI.SUM))
        self._done()
        lo, hi = got[: send.size], got[send.size:] + (got[: send.size] >> 32)
        over = np.flatnonzero((hi < -(1 << 31)) | (hi >= 1 << 31))
        if over.size:
            i = int(over[0])
            exact = int(hi[i]) * (1 << 32) + int(lo[i] & 0xFFFFFFFF)
            raise InvalidArgument("values", f"the sum at index {i} is {exact}, past int64 ({over.size} element(s) "
                                            f"overflow), in allreduce_ints at seq {self._last_seq} ({self._last_site})")
        return (hi << 32) | (lo & 0xFFFFFFFF)

    def allgather_ints(
        self, values: Sequence[int] | np.ndarray, *, site: str | None = None
    ) -> list[np.ndarray]:
        """Every rank's int64 array (lengths may differ per rank), as a list indexed by rank.  Values that are
        not int64 on some rank: every rank raises InvalidArgument("values") naming those ranks, and none gathers."""
        return self._allgather_ints("allgather_ints", values, site)

    def _allgather_ints(self, op: str, values: Any, site: str | None, decide: Any = None) -> Any:
        """The parts, or ``decide(parts)`` where given (poll_symmetric's decisions): past _AGREE_BYTES gathered, its
        memory is sized by every rank's values, like the receive buffer's, so every rank agrees that every rank
        made it (one more small allgather, as after a flush that big) and raises the same InvalidArgument where
        some could not.  Under it a MemoryError there is this rank's alone (an agreement would cost every call)."""
        bad = None
        try:
            send = _int64_values(values)
        except Exception as exc:  # any, like allreduce_ints': raised here alone, it stranded the others
            bad, send = exc, np.empty(0, dtype=np.int64)
        hdr = self._header(op, "int64[]", -1, site, 0, int(bad is not None))
        self._refuse_bad_input(hdr, bad, "values", "values that are not int64", "gathered")
        try:
            parts = self._gatherv(send, np.int64)
        except _GatherFailed as gf:
            err = InvalidArgument("values", f"{gf}, in {op} at seq {self._last_seq} ({self._last_site}); no rank "
                                            "gathered")
            err.ranks = tuple(sorted(gf.failed))
            raise err from gf.local
        if decide is None or sum(p.size for p in parts) * 8 <= _AGREE_BYTES:  # (every rank has the same sizes)
            self._done()
            return parts if decide is None else decide(parts)
        local: BaseException | None = None
        stop: BaseException | None = None
        try:
            got = decide(parts)
        except Exception as exc:
            local, got = exc, None
        except BaseException as exc:  # Ctrl-C: no failure to agree on, re-raised after it (never stranding)
            stop, got = exc, None
        failed = self._agree_failures(None if local is None else _cause(local))
        self._done()
        if stop is not None:
            raise stop
        if failed:
            causes = "; ".join(f"rank {r}: {c}" for r, c in sorted(failed.items()))
            err = InvalidArgument("values", f"rank(s) {sorted(failed)} could not decide over the gathered values "
                                            f"({causes}), in {op} at seq {self._last_seq} ({self._last_site}); no "
                                            "rank decided")
            err.ranks = tuple(sorted(failed))
            raise err from local
        return got

    def push(self, payload: Any) -> None:
        """Buffer a per-rank payload (any picklable object). Local; safe on divergent paths."""
        self._buffer.append(payload)

    def flush(self, *, site: str | None = None) -> list[list[Any]]:
        """Exchange buffered payloads: ``result[r]`` is rank r's pushed payloads, in push order.

        Call it at a point every rank reaches every iteration; a rank with nothing buffered still
        participates.  When every buffer is empty it costs one header exchange.
        """
        items, self._buffer = self._buffer, []
        # Pickled before the exchange: a payload that cannot be pickled once raised between the header and
        # the gather, which left the other ranks waiting in the gather.  This rank now joins the header with
        # nothing and every rank raises (no rank exchanges), each with its payloads on the error (``payloads``):
        # never lost, never stranding.
        bad: BaseException | None = None
        data = b""
        plain = True
        if items:
            try:
                f = io.BytesIO()
                pickler = _Pickler(f, protocol=pickle.HIGHEST_PROTOCOL)
                pickler.dump(items)
                data, plain = f.getvalue(), pickler.plain
            except Exception as exc:  # a MemoryError too: every rank raises, naming it
                bad, data = exc, b""
        try:  # the header's own refusals too (a site that is not a str, a closed group): they dropped the payloads
            # p2: this rank's payload may not unpickle on every rank (it holds more than builtin scalars/containers)
            hdr = self._header("flush", "pickle", -1, site, 1 if data else 0, int(bad is not None), int(not plain))
            self._refuse_bad_input(hdr, bad, "payload", "a payload that cannot be pickled", "exchanged")
        except InvalidArgument as err:
            err.payloads = items  # this rank's, never sent: nothing lost (push them again)
            raise
        if hdr[4] == 0:  # no rank had anything: same decision everywhere, skip the gather
            self._done()
            return [[] for _ in range(self.size)]
        try:
            blobs = self._gatherv(np.frombuffer(data, dtype=np.uint8), np.uint8)
        except _GatherFailed as gf:  # no rank exchanged: each keeps its own payloads, as for a pickling failure
            err = InvalidArgument("payload", f"{gf}, in flush at seq {self._last_seq} ({self._last_site}); no rank "
                                             "exchanged; this rank's payloads are on this error's .payloads")
            err.payloads, err.ranks = items, tuple(sorted(gf.failed))
            raise err from gf.local
        # A payload that may not unpickle on every rank (a class only some ranks can import, memory for a big one):
        # a rank that raised here alone left the others going on (to a desync or a timeout later).  Every rank
        # learns which ranks could not decode, and why (one small allgather, only on this path: plain payloads
        # under _AGREE_BYTES decode wherever they were pickled, memory permitting: a MemoryError there is that rank's
        # alone, the documented limit).  The same branch on every rank (header, sizes).
        agree = hdr[6] > 0 or sum(b.size for b in blobs) > _AGREE_BYTES
        if not agree:
            self._done()
        out, undecoded = _unpickle_all(blobs)
        first = min(undecoded) if undecoded else -1
        mine = None if not undecoded else f"rank {first}'s payload: {_cause(undecoded[first])}"
        if agree:
            failed = self._agree_failures(mine)
            self._done()
        else:
            failed = {} if mine is None else {self.rank: mine}
        if failed:
            # Nothing is lost: the payloads this rank decoded are on .result (None for a blob that failed), the
            # raw ones it could not decode on .blobs.
            causes = "; ".join(f"rank {r}: {c}" for r, c in sorted(failed.items()))
            err = InvalidArgument(
                "payload", f"payloads in this flush at seq {self._last_seq} ({self._last_site}) cannot be unpickled "
                           f"on rank(s) {sorted(failed)} ({causes}); the decoded ones are on this error's .result, "
                           "the raw bytes on .blobs")
            err.result, err.blobs, err.ranks = out, {r: blobs[r].tobytes() for r in undecoded}, tuple(sorted(failed))
            raise err from (undecoded[first] if undecoded else None)
        return out

    # ------------------------------------------------------------------ housekeeping

    def statistics(self) -> GroupStatistics:
        return GroupStatistics(
            rank=self.rank,
            size=self.size,
            seq=self._seq,
            collectives=self._collectives,
            slow_waits=self._slow_waits,
            buffered=len(self._buffer),
            broken=self._broken is not None,
        )

    @property
    def broken(self) -> Exception | None:
        """The error that broke the group, or None."""
        return self._broken

    def abort(self, code: int = 1) -> None:
        """Abort every process of the job (the way out after a watchdog timeout).

        Uses COMM_WORLD, not the group's duplicated communicator: an abort on a derived communicator
        left the sleeping absent rank alive in one CI run (MPICH 5.0.2), while a world abort always
        tears the whole job down."""
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)

    def close(self, *, site: str | None = None) -> None:
        """Free the duplicated communicators. Collective; skip it on a broken group (abort instead).
        Idempotent (a second call freed freed handles: a raw MPI error).

        A ledger-checked exchange comes first, like every other collective: a rank that closed while the
        others made a collective went on silently (freeing is local in MPICH), while they timed out waiting
        for it.  Now every rank raises CollectiveDesyncError naming ``close`` and the other op.  Payloads pushed and
        never flushed on some rank: every rank raises InvalidArgument("close") after closing (each its own on
        ``.payloads``)."""
        if self._broken is not None:
            raise self._broken
        if self._open:  # freeing a pending request was a raw MPI error
            self._break_unfinished()
        if self._closed:
            return
        # Pushed, never flushed: not dropped without a word, and said on every rank (p1), not only where they were
        # (that rank raised, the others returned and went on: the ranks on two paths).
        bad = None if not self._buffer else InvalidArgument(
            "close", f"{len(self._buffer)} pushed payload(s) were never flushed (on this error's .payloads)")
        hdr = self._header("close", "none", 0, site, 0, int(bad is not None))
        items, self._buffer = self._buffer, []
        try:
            self._refuse_bad_input(hdr, bad, "close", "payloads never flushed", "dropped them; the group is closed")
        except InvalidArgument as err:
            self._free()
            err.payloads = items  # this rank's ([] where it pushed none)
            raise
        self._done()
        self._free()

    def _free(self) -> None:
        """Free the communicators and the header request (local: no exchange)."""
        self._closed = True
        self._drain_arrivals()
        self._hreq.Free()
        self._comm.Free()
        self._side.Free()

    # ------------------------------------------------------------------ the ledger

    def _refuse_bad_input(self, hdr: Any, bad: BaseException | None, name: str, what: str, verb: str) -> None:
        """After the header of a collective whose ``p1`` says whether this rank's input was bad: when some rank's
        was (MAX over ranks), every rank learns which, and why (one more gather: every rank is here), and raises
        InvalidArgument.  A rank that joined with nothing in place of bad input, the others going on with an
        answer that silently lacked its part, left the ranks on different paths (one raising, the others not):
        the divergence these helpers exist to prevent.  The group stays usable."""
        if hdr[5] <= 0:
            return
        failed = self._agree_failures(None if bad is None else _cause(bad))
        self._done()
        causes = "; ".join(f"rank {r}: {c}" for r, c in sorted(failed.items()))
        err = InvalidArgument(name, f"rank(s) {sorted(failed)} passed {what} to {self._op} at seq {self._last_seq} "
                                    f"({self._last_site}); no rank {verb} ({causes})")
        err.ranks = tuple(sorted(failed))
        raise err from bad

    def _agree_failures(self, cause: str | None) -> dict[int, str]:
        """Every rank's failure at this step, rank -> its cause (cut to _CAUSE_BYTES), from one small allgather:
        the same answer on every rank, so every rank raises the same error."""
        rec = np.zeros(_CAUSE_BYTES, dtype=np.uint8)
        if cause is not None:
            text = cause.encode("utf-8", "backslashreplace")[: _CAUSE_BYTES - 1]
            rec[0] = 1
            rec[1 : 1 + len(text)] = np.frombuffer(text, dtype=np.uint8)
        recs = np.empty((self.size, _CAUSE_BYTES), dtype=np.uint8)
        self._wait(self._comm.Iallgather(rec, recs))
        return {r: recs[r, 1:].tobytes().rstrip(b"\0").decode("utf-8", "replace")
                for r in range(self.size) if recs[r, 0]}

    def _header(self, op: str, kind: str, size: int, site: str | None, p0: int, p1: int, p2: int = 0) -> Any:
        """The ledger-checked header exchange that starts every logical collective."""
        if self._broken is not None:
            raise self._broken
        if self._open:
            self._break_unfinished()
        if self._closed:
            raise InvalidArgument("group", f"this RankGroup is closed (rank {self.rank}, {op})")
        site_err = _check_site(site)
        if site is None:
            site = _call_site()
        elif site_err is not None:
            # joins under a site no rank can name: a desync naming it on every rank (never stranding them)
            site = f"<invalid site: {site_err}>"
        else:
            # a str subclass (np.str_) as a plain str: the hash takes repr(), which differs ("np.str_('step')")
            # while the text, all the report compares, does not (a bare IndexError out of _desync on every rank)
            site = str.__str__(site)
        seq = self._seq
        send = self._send
        if self.ledger:
            key = (site, op, kind, size)
            fp = self._fp_cache.get(key)
            if fp is None:
                if len(self._fp_cache) >= _FP_CACHE_MAX:
                    self._fp_cache.clear()
                digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
                fp = self._fp_cache[key] = int.from_bytes(digest, "little") & _FP_MASK
            send[0] = fp
            send[1] = -fp
        send[2] = seq
        send[3] = -seq
        send[4] = p0
        send[5] = p1
        send[6] = p2
        self._site = site
        self._op = op
        self._kind = kind
        self._size_decl = size
        self._phase = 0
        self._open = True
        req = self._hreq
        req.Start()
        self._wait(req)
        recv = self._recv
        if self.ledger and (recv[0] != -recv[1] or recv[2] != -recv[3]):
            self._desync()
        if site_err is not None:
            self._done()  # every rank passed the same invalid site: each raises, in step
            raise InvalidArgument("site", site_err)
        return recv

    def _break_unfinished(self) -> None:
        """The previous collective never finished on this rank: an exception (Ctrl-C, a signal handler, a
        timer) left its wait, or another thread is inside one.  Its MPI request may still be pending and can
        never be cancelled: the group is broken (a raw MPI error came next before)."""
        cur = self._current
        self._break(CollectiveDesyncError(
            f"collective #{cur.seq} ({cur.op} at {cur.site}) did not finish on rank {self.rank}: interrupted "
            "by an exception, or this group is used from two threads at once (one thread at a time); "
            "abort the job", seq_no=cur.seq, field="interrupted", sites={self.rank: cur.site}),
            # logged like a desync or a timeout: the audit saw the other ranks' timeouts and nothing from this one
            dict(request=None, rank=self.rank, role=None, seq_no=cur.seq, field="interrupted",
                 sites=[cur.site if r == self.rank else None for r in range(self.size)]))

    @property
    def _current(self) -> Fingerprint:
        return Fingerprint(self._seq, self._site, self._op, self._kind, self._size_decl)

    def _done(self) -> None:
        self._open = False
        self._last_seq = self._seq
        self._last_site = self._site
        self._seq += 1
        self._collectives += 1
        if self._collectives % _DRAIN_EVERY == 0:
            # A rank that never waits long (always the last to arrive) never read the notices the others
            # sent while they waited for it: MPI's unexpected-message queue grew by one per slow wait of
            # every other rank, for the life of the job.
            self._pending_sends = [(r, b) for r, b in self._pending_sends if not r.Test()]
            self._drain_arrivals()

    def _break(self, err: Exception, event: dict[str, Any] | None = None) -> None:
        """Break the group with ``err`` and raise it; ``event`` is logged first.  A logger that raises (a
        closed sink) once replaced the error and left the group unbroken; it is a note on ``err`` now."""
        self._open = False
        self._broken = err
        if event is not None:
            try:
                # A line the logger filters out by level takes no seq (_common_fields takes it): a seq taken for a
                # line never written reads as a lost line, a seq_gap, in the process's stream (engine.py's
                # _logger_info asks the same way)
                logger = log.bind()
                if logstream.writes(logger, _ERROR):
                    logger.error("lifecycle.collective_desync", **event, **_common_fields())
            except Exception as exc:
                note = f"the structlog event could not be logged: {exc!r:.200}"
                if hasattr(err, "add_note"):
                    err.add_note(note)
                else:  # Python 3.10
                    err.__notes__ = [*getattr(err, "__notes__", []), note]
        raise err

    def _desync(self) -> None:
        # Every rank got the same reduced header, so every rank is here: one more gather is safe.
        mine = self._current
        blobs = self._gatherv(np.frombuffer(pickle.dumps(mine), dtype=np.uint8), np.uint8)
        fps: dict[int, Fingerprint] = {r: pickle.loads(b.tobytes()) for r, b in enumerate(blobs)}
        fields = [f for f in _FIELDS if len({getattr(p, f) for p in fps.values()}) > 1]
        invalid = sorted(r for r, p in fps.items() if p.size == _INVALID_SIZE)
        if fields == ["size"] and invalid and len({p.size for p in fps.values()} - {_INVALID_SIZE}) <= 1:
            # allreduce_ints values that are not int64 on some ranks, nothing else differs: every rank is
            # here at the same step, so each raises InvalidArgument and the group stays in step
            self._done()
            raise _InvalidValues(f"rank(s) {invalid} passed values that are not int64 to {self._op} at seq "
                                 f"{self._last_seq} ({self._site}); no rank reduced")
        field = fields[0]
        seq_no = min(p.seq for p in fps.values())
        err = _desync_error(seq_no, field, fps, self.rank)
        self._break(err, dict(request=None, rank=self.rank, role=None, seq_no=seq_no, field=field,
                              sites=[fps[r].site for r in range(self.size)]))

    def _gatherv(self, send: np.ndarray, dtype: Any) -> list[np.ndarray]:
        """Every rank's ``send``.  _GatherFailed (the collective done, on every rank alike) where a receive buffer
        past _AGREE_BYTES could not be allocated on some rank."""
        MPI = self._MPI
        counts = np.empty(self.size, dtype=np.int64)
        self._wait(self._comm.Iallgather(np.array([send.size], dtype=np.int64), counts))
        displs = np.zeros(self.size, dtype=np.int64)
        np.cumsum(counts[:-1], out=displs[1:])
        total = int(counts.sum())
        nbytes = total * np.dtype(dtype).itemsize
        if nbytes > _AGREE_BYTES:  # (every rank has the same counts: the same branch everywhere)
            # Sized by the other ranks' payloads, so it may fail here alone: a MemoryError raised out of this rank
            # left the others in the gather below until their watchdog.  Every rank learns it first.
            local: BaseException | None = None
            try:
                recv = np.empty(total, dtype=dtype)
            except Exception as exc:
                local = exc
            failed = self._agree_failures(None if local is None else _cause(local))
            if failed:
                self._done()
                raise _GatherFailed(failed, nbytes, local)
        else:
            recv = np.empty(total, dtype=dtype)
        mpitype = MPI.INT64_T if dtype is np.int64 else MPI.BYTE
        self._wait(self._comm.Iallgatherv(send, [recv, (counts, displs), mpitype]))
        return [recv[displs[r] : displs[r] + counts[r]] for r in range(self.size)]

    # ------------------------------------------------------------------ the watchdog

    def _wait(self, req: Any) -> None:
        """Poll ``req`` to completion or raise CollectiveTimeoutError after the watchdog.

        An exception from outside (KeyboardInterrupt, a signal handler) leaves ``_open`` set: the next
        call on this group raises a typed error instead of starting MPI requests over a pending one."""
        test = req.Test
        for _ in range(64):  # hot path: small collectives complete within a few polls
            if test():
                self._phase += 1
                return
        start = time.monotonic()
        spin_until = start + self.spin
        while time.monotonic() < spin_until:  # then keep the core briefly, like a blocking call
            if test():
                self._phase += 1
                return
        deadline = start + self.watchdog
        announced = False
        nap = 0.0
        while not test():
            now = time.monotonic()
            if not announced and now - start >= self.announce_after:
                self._announce()
                announced = True
            if announced:
                self._drain_arrivals()
                if now >= deadline + self._grace:
                    self._timeout(now - start)
            # yield the core: ranks may be oversubscribed (4 ranks on 2 cores in CI)
            nap = min(1e-3, nap * 2 + 1e-6) if now - start > 2e-3 else 0.0
            time.sleep(nap)
        self._phase += 1

    def _announce(self) -> None:
        self._slow_waits += 1
        cur = self._current
        # surrogatepass: a site may hold a lone surrogate (a source file whose name is not UTF-8, an explicit
        # site); strict UTF-8 raised UnicodeEncodeError out of the wait and broke the group on this rank alone
        msg = f"{cur.seq} {self._phase} {cur.site}".encode("utf-8", "surrogatepass")
        self._pending_sends = [(r, b) for r, b in self._pending_sends if not r.Test()]
        for dest in range(self.size):
            if dest != self.rank:
                buf = bytes(msg)
                self._pending_sends.append((self._side.Isend([buf, self._MPI.BYTE], dest, _TAG_ARRIVAL), buf))

    def _drain_arrivals(self) -> None:
        MPI, st = self._MPI, self._status
        while self._side.Iprobe(MPI.ANY_SOURCE, _TAG_ARRIVAL, st):
            src = st.Get_source()
            buf = bytearray(st.Get_count(MPI.BYTE))
            self._side.Recv([buf, MPI.BYTE], src, _TAG_ARRIVAL)
            seq, phase, site = buf.decode("utf-8", "surrogatepass").split(" ", 2)
            entry = (int(seq), int(phase), site)
            if entry[:2] > self._arrivals.get(src, (-1, -1, ""))[:2]:
                self._arrivals[src] = entry

    def _timeout(self, waited: float) -> None:
        cur = self._current
        here = (cur.seq, self._phase)
        arrived = {self.rank: cur.site}
        missing = []
        for r in range(self.size):
            if r == self.rank:
                continue
            seen = self._arrivals.get(r)
            if seen is not None and seen[:2] >= here:
                arrived[r] = seen[2]
            else:
                missing.append(r)
        if self._phase > 0:  # a payload phase: everyone completed this collective's header
            last_done: tuple[int, str] | None = (cur.seq, cur.site)
        elif self._last_seq >= 0:
            last_done = (self._last_seq, self._last_site)
        else:
            last_done = None
        err = _timeout_error(cur.seq, cur.site, cur.op, self.rank, tuple(missing), arrived, last_done, waited)
        last = "never completed a collective" if last_done is None else last_done[1]
        self._break(err, dict(request=None, rank=self.rank, role=None, seq_no=cur.seq, field="arrival",
                              sites=[arrived.get(r, last) for r in range(self.size)], missing=list(missing)))


# ---------------------------------------------------------------------- consensus over engine states

_KNOWN, _TERMINAL, _COMPLETED, _FAILED = 1, 2, 4, 8
_TERMINAL_STATES = frozenset({"Quiesced", "Poisoned", "Terminated"})
_FAILED_OUTCOMES = frozenset({"failed", "expired"})


@dataclass(frozen=True)
class SymmetricDecisions:
    """Decisions that are identical on every rank of the group (DESIGN.md §8 consensus).

    Over the union of the request ids that the ranks passed in:
      failed     failed on some rank (Poisoned, or terminated with outcome failed/expired): union
      completed  Quiesced(completed) (or terminated after it) on every rank: unanimity
      quiesced   Quiesced (or terminated after it) on every rank: intersection; evidence everywhere
      poisoned   terminal on every rank, Poisoned (or terminated after it) on some: quarantined there
      terminal   terminal (Quiesced, Poisoned or Terminated) on every rank: quiesced | poisoned, the ids
                 every rank may finalize now
      pending    not yet terminal on every rank (may overlap ``failed``)

    ``quiesced`` held the Poisoned ids too before (it meant ``terminal``): code that finalizes what it holds
    finalizes ``terminal`` now.
    """

    seq_no: int
    failed: frozenset[int]
    completed: frozenset[int]  # Invariant: completed <= quiesced, completed & failed == {}
    quiesced: frozenset[int]  # Invariant: quiesced == terminal - failed
    pending: frozenset[int]  # Invariant: pending == all ids - terminal
    poll_errors: frozenset[int]  # ranks whose engine.poll() raised this round (re-raised there)
    terminal: frozenset[int]  # Invariant: terminal == quiesced | poisoned (disjoint)
    poisoned: frozenset[int]  # Invariant: poisoned == terminal & failed


def _unknown_request_errors() -> tuple[type[BaseException], ...]:
    from .errors import UnknownRequest

    return (LookupError, UnknownRequest)


# Per engine: request id -> (state, outcome) of a session that poll_symmetric saw end (in its own poll()'s transitions,
# or terminal when it read the id), kept while a caller passes the id in.  Its tombstone may go before every rank agrees (a bounded window: later terminations
# evict it, maybe in the same poll); read afresh, it was "not tracked on this rank", pending for ever.
# With it, per engine: (id(group), site) -> the ids of that caller's last call, the newest caller last, at most
# _CALLERS_MAX of them.  An id is kept while some caller passed it in its last call: pruned to each call's own ids,
# an engine polled in two calls per iteration (its senders and its receivers) lost in one what the other's poll saw.
_ENDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CALLERS_MAX = 64


def _ended_of(engine: Any) -> tuple[dict[int, tuple[str, str | None]], dict[tuple[int, Any], frozenset[int]]]:
    try:
        return _ENDED.setdefault(engine, ({}, {}))
    except TypeError:  # an engine-like object that takes no weak reference: this call's only
        return {}, {}


def _prune_ended(ended: dict[int, tuple[str, str | None]], callers: dict[tuple[int, Any], frozenset[int]],
                 caller: tuple[int, Any], ids: list[int]) -> None:
    """Note ``caller``'s ids, then drop from ``ended`` what no caller passed in its last call (done with it)."""
    callers.pop(caller, None)
    callers[caller] = frozenset(ids)
    for old in list(callers)[:-_CALLERS_MAX]:  # (pop, copies: another thread may poll this engine too)
        callers.pop(old, None)
    stale = set(ended).difference(ids)
    for passed in list(callers.values()):
        if not stale:
            break
        stale -= passed
    for r in stale:
        ended.pop(r, None)


def _note_ended(ended: dict[int, tuple[str, str | None]], transitions: Any) -> None:
    """Record what each session ended as, from TransferEngine.poll()'s transitions (a stand-in's poll() may return
    anything else: nothing is recorded).  A later advertise of the id is another session: forgotten."""
    if not isinstance(transitions, list):
        return
    for t in transitions:
        req, to = getattr(t, "request", None), getattr(getattr(t, "to_state", None), "name", None)
        if not isinstance(req, int) or not isinstance(to, str):
            continue
        if to in _TERMINAL_STATES:
            outcome = getattr(t, "outcome", None)
            ended[req] = (to, None if outcome is None else outcome.name)
        elif getattr(t, "from_state", 0) is None:  # the creating advertise
            ended.pop(req, None)


def _local_flags(engine: Any, req: int, unknown: tuple[type[BaseException], ...],
                 ended: dict[int, tuple[str, str | None]]) -> int:
    try:
        state = engine.state(req).name
        outcome = engine.outcome(req)
        name = None if outcome is None else outcome.name
    except unknown:
        seen = ended.get(req)  # (one lookup: another thread's poll may prune the memo meanwhile)
        if seen is None:
            return 0  # not tracked on this rank (yet): counts as not terminal, not completed
        state, name = seen  # ended, and forgotten since (_ENDED)
    else:  # the engine knows the id: its session (a new one, maybe) is what counts, now and once forgotten
        if state in _TERMINAL_STATES:
            ended[req] = (state, name)
        else:
            ended.pop(req, None)
    flags = _KNOWN
    if state in _TERMINAL_STATES:
        flags |= _TERMINAL
    if state == "Poisoned" or (state == "Terminated" and name in _FAILED_OUTCOMES):
        flags |= _FAILED
    elif state in ("Quiesced", "Terminated") and name == "completed":
        flags |= _COMPLETED
    return flags


def _request_id(r: Any) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= int(r) < 1 << 64:
        raise InvalidArgument("requests", f"expected request ids in [0, 2**64), got {_shown(r):.40}")
    return int(r)


def _iter_requests(requests: Any) -> Any:
    try:
        return iter(requests)
    except TypeError:  # only iter()'s own: a TypeError from inside a generator is that generator's error
        raise InvalidArgument("requests",
                              f"expected an iterable of request ids, got {type(requests).__name__}") from None


def poll_symmetric(
    engine: Any, group: RankGroup, requests: Iterable[int], *, site: str | None = None
) -> SymmetricDecisions:
    """Poll the local engine, then agree with every rank on what finished. Collective.

    Call it unconditionally on every rank every iteration.  ``requests`` is the set of request ids
    this rank tracks; ranks may pass different sets (a request not yet advertised on some rank),
    the decisions cover their union and are identical on every rank.  Uses ``engine.poll()``,
    ``engine.state(req).name`` and ``engine.outcome(req).name`` only.  A session that this call's poll saw end
    (TransferEngine.poll()'s transitions) counts as what it ended as while the id is passed in (by some caller's last
    call: a group and site), also once its
    tombstone is gone (it read as "not tracked here": pending for ever).

    Cost: one header exchange plus an allgather of the sizes and one of ``1 + 2 * len(requests)`` int64 per rank
    (the poll-error flag, then an (id, flags) pair per request); past 1 MiB in all, two small allgathers more (every
    rank allocated the ids, and decided: else every rank raises InvalidArgument).  If the
    local ``engine.poll()`` raises (or iterating ``requests``, an invalid id, ``state``/``outcome``), this rank still
    joins the collective and re-raises afterwards, whatever failed after it; the other ranks see it in ``poll_errors``.
    """
    if not isinstance(group, RankGroup) and not all(
        callable(getattr(group, name, None)) for name in ("allgather_ints", "statistics")
    ):
        # before engine.poll(): a None ran the poll, then raised a bare AttributeError (no group to join anyway)
        raise InvalidArgument("group", f"expected a RankGroup, got {type(group).__name__} {_shown(group):.40}")
    poll_error: BaseException | None = None
    ended, callers = _ended_of(engine)
    try:
        _note_ended(ended, engine.poll())
    except BaseException as exc:  # re-raised below, after the collective: never strand the others
        poll_error = exc
        # a callback's error took the place of the batch (TerminateCallbackError.transitions): its sessions ended
        _note_ended(ended, getattr(exc, "transitions", None))
    unknown = _unknown_request_errors()
    # Bad ids too join the collective first (they raised before it: the other ranks waited it out), and so does
    # the iterable's own error (a generator that raised ValueError escaped before it, and this rank's next call
    # paired with the others' poll_symmetric).  Re-raised after it, like poll()'s.
    read = False
    try:
        ids = sorted({_request_id(r) for r in _iter_requests(requests)})
        read = True
    except BaseException as exc:
        poll_error, ids = (poll_error or exc), []
    flags = []
    for r in ids:
        try:
            flags.append(_local_flags(engine, r, unknown, ended))
        except BaseException as exc:  # its own error, or Ctrl-C while it reads: re-raised after the collective too
            poll_error = poll_error or exc
            flags.append(0)
    try:  # (the flags' conversion too: an array as big as the ids', unguarded after it, raised here alone as well)
        local = np.empty(1 + 2 * len(ids), dtype=np.int64)
        local[1::2] = np.array(ids, dtype=np.uint64).view(np.int64)  # ids are uint64: two's complement on the wire
        local[2::2] = flags
    except Exception as exc:  # a MemoryError (many ids): raised here alone, it stranded the others in the collective
        poll_error, ids, read = (poll_error or exc), [], False
        local = np.zeros(1, dtype=np.int64)
    local[0] = 1 if poll_error is not None else 0
    seq_no = group.statistics().seq
    site = _call_site() if site is None else site
    if read:
        _prune_ended(ended, callers, (id(group), site if isinstance(site, str) else None), ids)

    # A rank whose poll failed raises that error, whatever failed after it (its decisions: a MemoryError; the
    # collective's own error: a receive buffer some rank could not allocate): it is the real cause, and the others
    # know of it (poll_errors), or raise too.  What failed later is its __context__.
    later: list[BaseException] = []

    def decide(parts: list[np.ndarray]) -> SymmetricDecisions | None:
        try:
            return _decisions(parts, group.size, seq_no)
        except Exception as exc:
            if poll_error is None:
                raise
            later.append(exc)  # not a failure for the others to agree on: this rank raises anyway
            return None

    try:
        if isinstance(group, RankGroup):  # the ledger names the op poll_symmetric
            decisions = group._allgather_ints("poll_symmetric", local, site, decide)
        else:  # a group-like stand-in (the demo's one-rank SoloGroup)
            decisions = decide(group.allgather_ints(local, site=site))
    except Exception as exc:
        if poll_error is None:
            raise
        later.append(exc)
    if poll_error is not None:
        if later:
            poll_error.__context__ = later[0]
        raise poll_error
    return decisions


def _decisions(parts: list[np.ndarray], n: int, seq_no: int) -> SymmetricDecisions:
    """poll_symmetric's decisions from every rank's (flag, (id, flags) pairs) part: the same on every rank."""
    everywhere: dict[int, int] = {}
    anywhere: dict[int, int] = {}
    seen: dict[int, int] = {}
    for part in parts:
        for req, flags in zip(part[1::2].view(np.uint64).tolist(), part[2::2].tolist()):
            everywhere[req] = everywhere.get(req, -1) & flags
            anywhere[req] = anywhere.get(req, 0) | flags
            seen[req] = seen.get(req, 0) + 1
    every = {r: (f if seen[r] == n else 0) for r, f in everywhere.items()}
    failed = frozenset(r for r, f in anywhere.items() if f & _FAILED)
    terminal = frozenset(r for r, f in every.items() if f & _TERMINAL)
    return SymmetricDecisions(
        seq_no=seq_no,
        failed=failed,
        completed=frozenset(r for r, f in every.items() if f & _COMPLETED),
        quiesced=terminal - failed,
        pending=frozenset(r for r, f in every.items() if not f & _TERMINAL),
        poll_errors=frozenset(r for r, part in enumerate(parts) if part[0]),
        terminal=terminal,
        poisoned=terminal & failed,
    )
