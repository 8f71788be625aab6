"""Transports that drive a :class:`~lifecycle.TransferEngine`: NIXL over UCX, and an in-process loopback.

A transport owns one agent and a C++ progress thread.  The executor advertises a session on the
engine, then either hands its range to the peer (``expect`` returns an :class:`Offer`: the range's
descriptor, a fresh tag and the session's role; this side is *passive*), or posts the transfer itself over
the peer's offer (``read`` / ``write``: this side is *active*; the op must suit both roles, DESIGN §9).  Every
notification names (request, tag), so a note of an earlier transfer of a reused id is never taken for the live
one's.  The progress thread turns backend statuses and peer notifications into engine events (DONE ->
complete, error -> fail, the peer's "done"/"quiesced" -> complete); the executor sees them, logged, on
``engine.poll()``.
Cancellation follows DESIGN §3: nothing is released without evidence (see docs/transport.md).

NIXL is loaded at run time from the installed ``nixl-cu12`` wheel (``libnixl_capi.so``, found without
importing ``nixl``); ``KV_LIFECYCLE_NIXL_CAPI`` overrides that path, and NixlTransport's ``capi_path`` overrides
both (a library that fails to load is named with where its path came from).  When it is missing, creating a
:class:`NixlTransport` raises :class:`~lifecycle.errors.NixlUnavailable`; everything else keeps working.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import importlib.util
import numbers
import os
import re
import struct
import threading
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .engine import _ROLE_CODE, Role
from .errors import InvalidArgument, NixlUnavailable, TransportError, _shown

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - exercised by hand
    raise ImportError(f"kv-lifecycle's compiled core is missing ({exc}); build it with `make build`") from exc

__all__ = [
    "Faults",
    "LoopbackTransport",
    "Mem",
    "NixlTransport",
    "Offer",
    "Registration",
    "TransportFailure",
    "TransportStats",
    "UCX_CUDA_DEFAULTS",
    "connect_all",
    "cuda12_runtime",
    "mem_of",
    "nixl_capi_path",
    "pool_slot",
    "stranded",
    "ucx_cuda_defaults",
]

ENV_CAPI = _core.NIXL_CAPI_ENV  # "KV_LIFECYCLE_NIXL_CAPI"
INSTALL_HINT = "pip install nixl-cu12==1.5.1"


def nixl_capi_path() -> str:
    """Path of ``libnixl_capi.so``: ``$KV_LIFECYCLE_NIXL_CAPI``, else the one in the nixl-cu12 wheel.

    Never imports ``nixl``.  Raises :class:`NixlUnavailable` when neither exists.
    """
    return _capi_path_and_source()[0]


def _capi_path_and_source() -> tuple[str, str]:
    """:func:`nixl_capi_path` and where it came from, as a NixlUnavailable message names it."""
    env = os.environ.get(ENV_CAPI)
    if env:
        return env, f"${ENV_CAPI}"
    spec = importlib.util.find_spec("nixl_cu12")
    if spec is None or spec.origin is None:
        raise NixlUnavailable(
            f"NIXL C API unavailable: the nixl-cu12 wheel is not installed; install it with `{INSTALL_HINT}` "
            f"or set {ENV_CAPI} to the path of libnixl_capi.so"
        )
    path = _wheel_capi(spec)
    if not path.exists():
        raise NixlUnavailable(
            f"NIXL C API unavailable: {path} not found in the installed nixl-cu12; reinstall it with "
            f"`{INSTALL_HINT}` or set {ENV_CAPI} to the path of libnixl_capi.so"
        )
    return str(path), "the installed nixl-cu12 wheel"


def _wheel_capi(spec) -> Path:
    return Path(spec.origin).parent.parent / ".nixl_cu12.mesonpy.libs" / "libnixl_capi.so"


def _is_wheel_capi(path: str) -> bool:
    """True when ``path`` is the nixl-cu12 wheel's libnixl_capi.so (its UCX is the one with these needs)."""
    try:
        spec = importlib.util.find_spec("nixl_cu12")
        return spec is not None and spec.origin is not None and os.path.samefile(path, _wheel_capi(spec))
    except (ImportError, ValueError, OSError):
        return False


CUDART12 = "libcudart.so.12"
_CUDART: list[str | None] = []  # memo of cuda12_runtime(): [where it came from, or None]
_CUDART_LOCK = threading.Lock()


def cuda12_runtime() -> str | None:
    """Make ``libcudart.so.12`` loadable for nixl-cu12's UCX; return where it comes from (None: nowhere).

    UCX's CUDA memory hooks in the nixl-cu12 wheel (``libucm_cuda``) need the CUDA 12 runtime.  Without
    it UCX takes CUDA memory for host memory and NIXL refuses to register VRAM.  A CUDA 12 torch loads it,
    but a CUDA 13 image lacks it.  When the loader cannot find it by name, the copy in the
    ``nvidia-cuda-runtime-cu12`` wheel is loaded, once, before NIXL starts UCX.  UCX's dlopen then finds it
    already loaded, by its soname.  NixlTransport calls this only for the wheel's NIXL.  It never raises."""
    with _CUDART_LOCK:
        if not _CUDART:
            try:
                found = _load_cuda12_runtime()
            except Exception:  # (a probe: whatever goes wrong, VRAM registration then says what is missing)
                found = None
            _CUDART.append(found)
        return _CUDART[0]


def _load_cuda12_runtime() -> str | None:
    found = None
    try:
        ctypes.CDLL(CUDART12)  # already loaded, or on the loader's path: UCX finds it too
        found = CUDART12
    except OSError:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            lib = Path(loc) / "lib" / CUDART12
            try:
                ctypes.CDLL(str(lib))
            except OSError:
                continue
            found = str(lib)
            break
    return _mapped(CUDART12) or found


def _mapped(soname: str) -> str | None:
    """The file of a loaded library named ``soname*`` (from /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps", "rb") as f:  # bytes: a mapped file's name need not be UTF-8
            for line in f:
                fields = line.rstrip(b"\n").split(None, 5)  # address perms offset dev inode [path]
                if len(fields) == 6:
                    path = os.fsdecode(fields[5]).removesuffix(" (deleted)")
                    if Path(path).name.startswith(soname):
                        return path
    except OSError:
        pass
    return None


def _vram_hint(wheel: bool) -> str:
    """What a refused VRAM registration lacks (reads the memo; loads nothing)."""
    if not wheel:
        return ("if this is CUDA memory: the UCX of this NIXL build has no CUDA support loaded "
                "(UCX_LOG_LEVEL=debug shows which UCX module failed to load)")
    src = _CUDART[0] if _CUDART else None
    if src is not None:
        return (f"if this is CUDA memory: {CUDART12} was loaded ({src}) before this agent started, so the cause "
                "is elsewhere (UCX loads its modules once a process: a UCX user started earlier without it would "
                "explain it); UCX_LOG_LEVEL=debug shows which UCX module failed to load")
    return (f"if this is CUDA memory: nixl-cu12's UCX handles it only when {CUDART12} (the CUDA 12 runtime) "
            "loads, and it does not here: `pip install nvidia-cuda-runtime-cu12` (a CUDA 12 torch brings it) "
            "or put its folder on LD_LIBRARY_PATH")


# UCX settings defaulted where UCX loads its CUDA transports (their libuct_cuda needs the driver's libcuda.so.1
# and libnvidia-ml.so.1; elsewhere UCX would warn the variable unused), never over a value already set.
# UCX_CUDA_IPC_ENABLE_GET_ZCOPY: without NVLink UCX software-emulates a READ of another process's CUDA memory,
# and UCX aborted the owner process when its peer died mid-reply; docs/transport.md ("Two processes on one GPU").
UCX_CUDA_DEFAULTS = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}


def ucx_cuda_defaults() -> dict[str, str]:
    """Apply :data:`UCX_CUDA_DEFAULTS` to ``os.environ`` (the process and its children) where the CUDA driver
    loads; return what was set.  NixlTransport calls it before its agent starts UCX."""
    todo = {k: v for k, v in UCX_CUDA_DEFAULTS.items() if k not in os.environ}
    if not todo or not _cuda_driver_loads():
        return {}
    os.environ.update(todo)
    return todo


@functools.cache
def _cuda_driver_loads() -> bool:
    """Whether the driver libraries UCX's CUDA transports need load (probed once a process)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def nixl_available() -> bool:
    """True when libnixl_capi.so loads and has every symbol this project uses."""
    try:
        # (as bytes: a $KV_LIFECYCLE_NIXL_CAPI naming a non-UTF-8 file decodes to surrogates, a bare TypeError)
        _core.load_nixl_capi(os.fsencode(nixl_capi_path()))
    except NixlUnavailable:
        return False
    return True


# ---- memory descriptors --------------------------------------------------------------------------
_DESC = struct.Struct("<4sQQBQ")  # magic, addr, nbytes, kind (0 dram / 1 vram), device


@dataclass(frozen=True, slots=True)
class Mem:
    """A contiguous memory range: local memory to register / transfer, or a peer's descriptor."""

    addr: int
    nbytes: int
    kind: str = "dram"  # "dram" (CPU) or "vram" (CUDA)
    device: int = 0

    def __post_init__(self) -> None:
        for name in ("addr", "nbytes", "device"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgument(name, f"expected an int >= 0, got {_shown(v)}")
        if not isinstance(self.kind, str) or self.kind not in ("dram", "vram"):  # (a numpy array: a bare ValueError)
            raise InvalidArgument("kind", f"expected 'dram' or 'vram', got {_shown(self.kind)}")
        if self.device >= 1 << 64:
            raise InvalidArgument("device", f"expected a 64-bit device index, got {_shown(self.device)}")
        if self.addr + self.nbytes > _core.REGION_END:  # the core's rule (Region::kEnd says why)
            raise InvalidArgument("nbytes", f"{_shown(self.nbytes)} bytes at address {self.addr:#x}: the range is "
                                            f"{_core.REGION_REFUSED}")

    def slice(self, offset: int, nbytes: int) -> Mem:
        for name, v in (("offset", offset), ("nbytes", nbytes)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidArgument(name, f"expected an int, got {type(v).__name__}")
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.nbytes:
            raise InvalidArgument("slice", f"[{_shown(offset)}, {_shown(offset + nbytes)}) outside [0, {self.nbytes})")
        return Mem(self.addr + offset, nbytes, self.kind, self.device)

    def to_bytes(self) -> bytes:
        """29 bytes to ship to the peer (with the metadata, over any channel)."""
        return _DESC.pack(b"KVLM", self.addr, self.nbytes, 0 if self.kind == "dram" else 1, self.device)

    @classmethod
    def from_bytes(cls, data: bytes) -> Mem:
        data = _check_bytes("descriptor", data)
        if len(data) != _DESC.size:
            raise InvalidArgument("descriptor", f"expected {_DESC.size} bytes, got {len(data)}")
        magic, addr, nbytes, kind, device = _DESC.unpack(data)
        if magic != b"KVLM" or kind > 1:
            raise InvalidArgument("descriptor", "not a kv-lifecycle memory descriptor")
        return cls(addr, nbytes, "dram" if kind == 0 else "vram", device)


_OFFER = struct.Struct("<4sQQBQQ")  # magic, addr, nbytes, kind, device, tag
# The offer's kind byte: bit 0 the memory kind (0 dram, 1 vram), bits 1-2 the offering session's role (0 none, as in
# every offer of a release before the role; 1 sender; 2 receiver), the other bits 0.  The core's codes: 0 / 1.
_ROLE_BITS = {None: 0, Role.sender: 1, Role.receiver: 2}
_ROLE_OF_BITS = {v: k for k, v in _ROLE_BITS.items()}
_ROLE_CORE = {None: None, **{Role(name): code for name, code in _ROLE_CODE.items()}}
_ROLE_OF_CORE = {v: k for k, v in _ROLE_CORE.items()}


def _check_bytes(name: str, data, what: str = "bytes") -> bytes:
    """``data``'s raw bytes (a memoryview of any item format or layout too: its len() counts items, not
    bytes); InvalidArgument for anything else (an int too: bytes(n) would be n zero bytes)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(name, f"expected {what}, got {type(data).__name__}")
    if isinstance(data, bytes):
        return data
    try:
        return bytes(data)
    except ValueError as e:  # a released memoryview: "operation forbidden on released memoryview object"
        raise InvalidArgument(name, f"expected {what}, got a {type(data).__name__} whose bytes cannot be read "
                                    f"({e})") from None


@dataclass(frozen=True, slots=True)
class Offer:
    """What a passive side ships to its peer: the descriptor of its range, the transfer's tag and its session's role.

    ``expect()`` returns it; the active side passes it (``Offer.from_bytes(...)``) to ``read`` / ``write``.
    The tag names this one transfer in every notification about it (the active side's "done", the passive
    side's "stop", the "quiesced" answer): a note of an earlier transfer of the same request id, or a
    duplicate, is never taken as evidence for it.  ``tag=0`` is for a peer without sessions (a bare
    transport: benchmarks), whose notes nobody matches.  An offer is posted at most once, by the session
    of its request id that it was handed to, never by a later session of the id: a stop that came before
    the post is remembered for that session only (docs/transport.md).

    ``role`` is the offering session's (DESIGN §9): a sender's offer is READ, a receiver's is WRITTEN, and
    ``read`` / ``write`` / ``transfer_batch`` refuse the other op (TransportError, nothing posted): two sessions
    of one id in the same role (an executor's bug) would otherwise overwrite the sender's blocks.  ``None``: not
    known (a bare transport's offer, an older release's bytes), and not checked.  On the wire it takes bits 1-2
    of the kind byte (0 none, 1 sender, 2 receiver; bit 0 is the memory kind): this release reads an older
    release's offers (no role), an older release refuses one with a role ("not a kv-lifecycle offer").
    """

    mem: Mem
    tag: int
    role: Role | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mem, Mem):
            raise InvalidArgument("mem", f"expected a Mem, got {type(self.mem).__name__}")
        if isinstance(self.tag, bool) or not isinstance(self.tag, int) or not 0 <= self.tag < 1 << 64:
            raise InvalidArgument("tag", f"expected a 64-bit tag, got {_shown(self.tag)}")
        if self.role is not None:
            if not isinstance(self.role, str) or self.role not in ("sender", "receiver"):
                raise InvalidArgument("role", f"expected 'sender', 'receiver' or None, got {_shown(self.role)}")
            object.__setattr__(self, "role", Role(self.role))  # (a str too: equal offers compare equal)

    def slice(self, offset: int, nbytes: int) -> Offer:
        return Offer(self.mem.slice(offset, nbytes), self.tag, self.role)

    def to_bytes(self) -> bytes:
        """37 bytes to ship to the peer (with the metadata, over any channel)."""
        m = self.mem
        kind = (0 if m.kind == "dram" else 1) | _ROLE_BITS[self.role] << 1
        return _OFFER.pack(b"KVLO", m.addr, m.nbytes, kind, m.device, self.tag)

    @classmethod
    def from_bytes(cls, data: bytes) -> Offer:
        data = _check_bytes("offer", data)
        if len(data) != _OFFER.size:
            raise InvalidArgument("offer", f"expected {_OFFER.size} bytes, got {len(data)}")
        magic, addr, nbytes, kind, device, tag = _OFFER.unpack(data)
        if magic != b"KVLO" or kind >> 1 not in _ROLE_OF_BITS:
            raise InvalidArgument("offer", "not a kv-lifecycle offer")
        return cls(Mem(addr, nbytes, "vram" if kind & 1 else "dram", device), tag, _ROLE_OF_BITS[kind >> 1])


def _ctypes_holds_objects(t) -> bool:
    """A ctypes type with a py_object in it: itself, an array's items, a structure's or union's fields."""
    if not isinstance(t, type):
        return False
    if issubclass(t, ctypes.py_object):
        return True
    if issubclass(t, ctypes.Array):
        return _ctypes_holds_objects(t._type_)
    if issubclass(t, (ctypes.Structure, ctypes.Union)):
        return any(_ctypes_holds_objects(f[1]) for f in getattr(t, "_fields_", ()))
    return False


def _holds_objects(mv: memoryview) -> bool:
    """Whether the buffer behind ``mv`` holds Python object references: its format says so (struct codes,
    field names ":name:" left out), or an exporter along its base chain does (a numpy array of a dtype with
    objects; a ctypes object with a py_object inside, which a union or a packed structure exports as plain
    bytes 'B')."""
    if "O" in re.sub(r":[^:]*:", "", mv.format):
        return True
    o = mv.obj
    for _ in range(64):  # the chain of views: an array's .base, a memoryview's .obj
        if getattr(getattr(o, "dtype", None), "hasobject", False) is True or _ctypes_holds_objects(type(o)):
            return True
        nxt = getattr(o, "base", None) if not isinstance(o, memoryview) else o.obj
        if nxt is None or nxt is o or isinstance(nxt, (bytes, bytearray)):
            return False
        o = nxt
    return False


def mem_of(obj) -> Mem:
    """The memory range of a torch tensor (CPU -> DRAM, CUDA -> VRAM), an engine buffer pool, a
    :class:`Mem`, or a writable buffer (bytearray, numpy array, memoryview).  Contiguous only."""
    if isinstance(obj, Mem):
        return obj
    if isinstance(obj, _core.BufferPool):
        if obj.nbytes == 0:  # (it named address 0: "invalid addr: null address")
            raise InvalidArgument("memory", "the engine's pool has no slots (num_slots=0): there is no memory range "
                                            "to name")
        return Mem(obj.base_address, obj.nbytes)
    if hasattr(obj, "data_ptr") and hasattr(obj, "device"):  # torch.Tensor, without importing torch
        layout = str(getattr(obj, "layout", "torch.strided"))
        if layout != "torch.strided":  # (a sparse CSR tensor raised a bare RuntimeError in is_contiguous)
            raise InvalidArgument("tensor", f"layout {layout}: only dense (strided) tensors are one memory range")
        if not obj.is_contiguous():
            raise InvalidArgument("tensor", "must be contiguous")
        lazy = [k for k in ("conj", "neg") if getattr(obj, f"is_{k}", lambda: False)()]
        if lazy:  # (a .conj() view's memory holds the unconjugated values: they would be moved as they are)
            raise InvalidArgument("tensor", f"a lazy {lazy[0]} view: its memory holds other values than the tensor; "
                                            f"register .resolve_{lazy[0]}() instead")
        nbytes = obj.numel() * obj.element_size()
        if nbytes == 0:
            raise InvalidArgument("tensor", "the tensor is empty: there is no memory range to name")
        dev = obj.device
        if dev.type not in ("cpu", "cuda"):
            raise InvalidArgument("tensor", f"device {dev} is neither cpu nor cuda")
        try:  # (inside torch.vmap or functionalize a tensor has no storage: torch's bare RuntimeError)
            ptr = obj.data_ptr()
            storage = obj.untyped_storage() if hasattr(obj, "untyped_storage") else None  # (stand-ins have none)
            lo, size = (ptr, nbytes) if storage is None else (storage.data_ptr(), storage.nbytes())
        except (RuntimeError, NotImplementedError) as e:
            raise InvalidArgument("tensor", f"it has no memory of its own to name ({e})") from None
        if ptr == 0 or lo == 0:
            raise InvalidArgument("tensor", "its data pointer is null: it has no memory (a fake tensor, or its "
                                            "storage was freed: untyped_storage().resize_(0))")
        if ptr < lo or ptr + nbytes > lo + size:
            # (a storage resized under the tensor, untyped_storage().resize_(n), leaves its sizes as they were: a
            # transfer wrote past the storage's allocation)
            raise InvalidArgument("tensor", f"its {nbytes} bytes at {ptr:#x} lie outside its storage ({size} bytes "
                                            f"at {lo:#x}): the storage was resized under it")
        if dev.type == "cpu":
            return Mem(ptr, nbytes)
        return Mem(ptr, nbytes, "vram", dev.index or 0)
    try:
        mv = memoryview(obj)
    except TypeError:
        # (said "cannot register" from expect / read / write too; a Registration is what register() returned)
        hint = ": pass its .mem" if isinstance(obj, Registration) else ""
        raise InvalidArgument("memory", f"{type(obj).__name__} names no memory range{hint} (pass a tensor, a pool, "
                                        "a Mem or a writable buffer)") from None
    except (ValueError, BufferError) as e:  # a released memoryview; an exporter that refuses (numpy datetime64)
        raise InvalidArgument("memory", f"the {type(obj).__name__}'s buffer cannot be exported ({e})") from None
    if mv.readonly or not mv.c_contiguous:
        raise InvalidArgument("memory", "buffer must be writable and C-contiguous")
    if mv.nbytes == 0:
        raise InvalidArgument("memory", f"the {type(obj).__name__} is empty: there is no memory range to name")
    if _holds_objects(mv):
        # (a numpy object array, a ctypes py_object array: a transfer into it overwrote live PyObject pointers,
        # and the process crashed at the next use of one)
        raise InvalidArgument("memory", f"the {type(obj).__name__} holds Python object references (buffer format "
                                        f"{mv.format!r}), not data: a transfer would overwrite them")
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mv.cast("B")))
    return Mem(addr, mv.nbytes)


def pool_slot(engine, request: int) -> Mem:
    """The pool slot leased to ``request``'s session (advertised with nbytes > 0; not yet Terminated)."""
    if not isinstance(engine, _core.Engine):
        raise InvalidArgument("engine", f"expected a TransferEngine, got {type(engine).__name__}")
    from .engine import FINAL, _session_info  # (a bare _core.Engine, accepted above, has no info())

    info = _session_info(engine, request)
    slot = info.slot
    if slot is None:
        raise InvalidArgument("request", f"request {request} holds no pool slot (advertise with nbytes > 0)")
    if info.state in FINAL:  # (info() still names the slot it held: answered here, another session's memory)
        raise InvalidArgument("request", f"request {request} is {info.state.value}: the slot it held went back to the "
                                         f"pool (or into quarantine) and may be leased to another session")
    pool = engine.pool
    return Mem(pool.base_address + slot * pool.slot_size, pool.slot_size)


@dataclass(frozen=True, slots=True)
class Registration:
    """What :meth:`register` returned: the region's id (ids restart at 1 in every transport) and range."""

    region_id: int
    mem: Mem
    transport: str = ""  # the name of the transport that made it (deregister checks it is its own)


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault injection around a transport; every decision is a pure function of the seed."""

    seed: int = 0
    delay: float = 0.0
    delay_s: float = 0.002
    error: float = 0.0
    disconnect: float = 0.0
    never_completes: float = 0.0
    drop_notification: float = 0.0
    duplicate_notification: float = 0.0
    release_failure: float = 0.0
    duplicate_after_s: float = 0.0  # 0: a duplicate right after its original; else held back this long (1 us steps)

    def __post_init__(self) -> None:
        # (the fields as they are: asdict() deep-copies each value first, and one that cannot be copied (a
        # memoryview, a lock) raised a bare TypeError before any check ran)
        for k, v in ((f.name, getattr(self, f.name)) for f in fields(self)):
            if k == "seed":
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
                    raise InvalidArgument(k, f"expected a 64-bit seed, got {_shown(v)}")
            elif k in ("delay_s", "duplicate_after_s"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
                    raise InvalidArgument(k, f"expected seconds in [0, 3600], got {_shown(v)}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise InvalidArgument(k, f"expected a probability in [0, 1], got {_shown(v)}")
        # one roll picks at most one of these (the wrapper, faulty.cpp): beyond 1 the later ones vanish
        status = self.delay + self.error + self.disconnect + self.never_completes
        if status > 1 + 1e-9:
            raise InvalidArgument("faults", "delay + error + disconnect + never_completes must not exceed 1 (one roll "
                                            f"picks at most one of them), got {status:g}")


@dataclass(frozen=True, slots=True)
class TransportStats:
    """Counters of one transport (``registered_regions``, ``live_xfers``, ``active``, ``passive``,
    ``watched``, ``unreleased``, ``held_offers``, ``remembered_stops``, ``posted_records``, ``forgone_offers`` and
    ``resends_pending`` are current values; the rest count since creation)."""

    registered_regions: int
    live_xfers: int
    active: int
    passive: int
    watched: int
    posted: int
    completed_in_post: int
    completed: int
    failed: int
    post_errors: int
    cancelled_before_post: int
    peer_stops: int
    stops_sent: int
    quiesced_sent: int
    done_received: int
    quiesced_received: int
    orphan_notifications: int
    bad_notifications: int
    send_errors: int
    release_failures: int
    unsafe_releases: int
    late_evidence: int
    abandoned: int
    passive_swept: int
    stops_unanswered: int
    unreleased: int
    unsafe_acks: int
    stale_notifications: int
    held_offers: int
    remembered_stops: int
    posted_records: int
    forgone_offers: int
    stops_resent: int
    resends_pending: int
    resends_skipped: int


class TransportFailure(tuple):
    """One entry of ``recent_failures()``: the pair ``(request, reason)`` it always was (compared and unpacked as
    before), with ``.serial``, the engine session whose transfer failed (``SessionInfo.serial``; 0 on a bare
    transport).  An entry outlives its session: a later session of the id has another serial."""

    def __new__(cls, request: int, reason: str, serial: int):
        self = super().__new__(cls, (request, reason))
        self.serial = serial
        return self

    request = property(lambda self: self[0])
    reason = property(lambda self: self[1])

    def __getnewargs__(self):  # (copy and pickle: the pair alone would lose the serial)
        return self[0], self[1], self.serial

    def __repr__(self) -> str:
        return f"TransportFailure(request={self[0]}, reason={self[1]!r}, serial={self.serial})"


# Registrations whose transport was dropped while the backend might still touch them (an offer out, a transfer
# released without evidence): (transport name, range, the object registered), kept alive for the life of the
# process, since a late write into freed memory would corrupt whatever took its place.
_STRANDED: list[tuple[str, Mem, object]] = []
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every transport facade of this process (the fork guard)
_INHERITED: list = []  # cores a forked child inherited: never destroyed there (their teardown is the parent's)


def stranded() -> dict:
    """Memory kept alive because whoever owned it was dropped while a transfer might still write it:
    ``registrations`` (transport name, :class:`Mem`) of dropped transports, and ``pool_bytes`` that dropped
    engines kept mapped for quarantined slots.  It stays for the life of the process."""
    return {"registrations": [(name, m) for name, m, _ in _STRANDED], "pool_bytes": _core.stranded_pool_bytes()}


class _InheritedCore:
    """What a forked child's transport holds instead of its core: every use is a TransportError (NIXL and UCX
    state does not survive fork(), and tearing it down in the child broke the parent's), except stop()."""

    def __init__(self, name: str, parent: int):
        self.name, self.parent = name, parent

    def stop(self) -> None:  # nothing runs here to stop: the progress thread stayed in the parent
        pass

    def __getattr__(self, attr: str):
        raise TransportError(f"transport {self.name!r} was made in process {self.parent}; this process "
                             f"({os.getpid()}) is a fork of it and cannot use it ({attr}): NIXL/UCX state does not "
                             "survive fork().  Make a new transport here")


def _after_fork_in_child() -> None:
    for t in list(_LIVE):
        core = t.__dict__.get("_core")
        if core is None or isinstance(core, _InheritedCore):
            continue
        name = t._name
        _INHERITED.append(core)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(core))  # not even interpreter exit destroys it here
        t._core = _InheritedCore(name, t._pid)


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Transport:
    """Shared facade; see :class:`NixlTransport` and :class:`LoopbackTransport`."""

    def __init__(self, core: _core._Transport, engine, faults: Faults | None):
        self._refuse_reinit()
        self._core = core
        self._name = core.name
        self._pid = os.getpid()
        self.engine = engine
        self.faults = faults
        self._regs: dict[int, Mem] = {}
        self._keep: dict[int, object] = {}  # registered objects stay alive while registered
        # registered objects whose memory can move under a live registration (a torch tensor's resize_, a
        # ctypes array's ctypes.resize): region id -> (the object registered, what holds its memory (a
        # tensor's storage), that holder's address at registration), checked on use
        # rid: (obj, holder, address, bytes: checked where a shrink keeps the address (numpy), else 0)
        self._movable: dict[int, tuple[object, object, int, int]] = {}
        # ... indexed for the check on use, rebuilt whole on (de)register: (the registered ranges' starts, sorted;
        # their (end, rid) in that order; the widest range's size; id(obj) -> (obj, rids))
        self._movable_index: tuple = ((), (), 0, {})
        # one rebuild of that index at a time (register/deregister on several threads): each reads the registrations
        # after every change made before it began, so the last one stored is never missing one
        self._index_lock = threading.Lock()

        _LIVE.add(self)

    def _refuse_reinit(self) -> None:
        """A second __init__ made a new core and dropped this one unstopped, with its registrations and the objects
        they keep alive: refused, before anything is made."""
        if "_core" in self.__dict__:
            raise TypeError(f"{type(self).__name__} {self._name!r}: __init__ called again on a live transport; make "
                            "a new transport instead")

    def __copy__(self):
        # (copy.copy shared the core: dropping the copy stopped this transport and deregistered its regions)
        raise TypeError(f"{type(self).__name__} {self._name!r} cannot be copied or pickled: a copy would share its agent, "
                        "and dropping the copy would stop this transport")

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce_ex__(self, protocol):
        self.__copy__()

    def __repr__(self) -> str:
        seed = "" if self.faults is None else f" fault_seed={self.faults.seed}"
        return f"<{type(self).__name__} {self._name!r}{seed}>"

    @property
    def name(self) -> str:
        return self._name

    def __del__(self) -> None:
        """Dropped: stop first (the binding lets the GIL go while the progress thread finishes its NIXL call;
        the core's destructor would join it holding the GIL), then deregister what the backend can no longer
        touch.  What it still may (an offer out, a transfer released without evidence) is stranded: kept alive
        for the life of the process (``stranded()``), as deregister() refuses it."""
        core = self.__dict__.get("_core")
        if core is None or isinstance(core, _InheritedCore):
            return
        try:
            core.stop()
            for rid, kept in list(self.__dict__.get("_keep", {}).items()):
                if isinstance(kept, _core.BufferPool):
                    continue  # an engine's pool: the pool itself keeps its quarantined slots mapped
                try:
                    core.deregister_region(rid)
                except TransportError:
                    _STRANDED.append((self._name, self._regs[rid], kept))
        except Exception:  # (a finalizer cannot raise; at interpreter exit the modules may be half gone)
            pass

    def _refused_hint(self, m: Mem) -> str:
        """Added to a refused registration's message (NixlTransport: what UCX lacks for VRAM)."""
        return ""

    # ---- memory and peers -------------------------------------------------------------------------
    def register(self, obj) -> Registration:
        """Register a tensor, the engine's pool (``engine.pool``), a :class:`Mem` or a writable buffer.

        The object is kept alive while registered, and its memory cannot move meanwhile where Python allows a
        guard: a bytearray or numpy array holds a buffer export (no resize), and so does the object under a
        numpy array or memoryview (``np.memmap``'s mmap: no close), a tensor's storage is held (so
        ``set_()`` cannot free it), and a CPU tensor's storage is made non-resizable, as torch does for a
        storage that numpy shares (``resize_()`` then raises RuntimeError; this stays after deregister).  A
        CUDA tensor's ``resize_()`` (a CPU one's where torch has no numpy), a CPU tensor's ``share_memory_()``
        (torch.multiprocessing does it to a tensor it sends) and a ctypes array's ``ctypes.resize`` cannot be
        blocked: they move the memory and free the registered range.  **Never resize or share registered
        memory.**  Every later call that
        names memory in such a region (read, write, transfer_batch, expect) checks that it has not moved, and
        raises TransportError if it has; a move while an offer of it is out cannot be seen in time."""
        m = mem_of(obj)
        try:
            rid = self._core.register_region(m.addr, m.nbytes, m.kind, m.device)
        except TransportError as e:
            hint = self._refused_hint(m)
            if hint and e.args and isinstance(e.args[0], str):
                e.args = (f"{e.args[0]}: {hint}",) + e.args[1:]
            raise
        try:  # (registered: anything that fails from here takes the registration back)
            keep, movable = obj, None
            if hasattr(obj, "data_ptr") and hasattr(obj, "untyped_storage"):  # a tensor: hold its storage
                storage = obj.untyped_storage()
                keep = (obj, storage)
                if m.kind == "dram":
                    _pin_cpu_storage(storage)  # resize_() raises from now on (where torch has numpy)
                # Checked on use in every case: a pinned CPU storage still moves under share_memory_() (also what
                # torch.multiprocessing does to a tensor it sends), which swaps in a shared-memory copy and frees
                # the registered memory; a later transfer over the registration wrote into the freed block.
                movable = (obj, storage, storage.data_ptr(), 0)  # (0: no shrink in place)
            elif not isinstance(obj, (Mem, _core.BufferPool)) and not hasattr(obj, "data_ptr"):
                # a buffer export held while registered: a bytearray cannot be resized (its memory moved) meanwhile
                keep = (obj, memoryview(obj))
                owner, root = _view_chain_end(obj)
                if root is not None:  # ... nor the one under a view of it, nor an mmap closed (numpy holds no export)
                    try:
                        keep += (memoryview(root),)
                    except (TypeError, ValueError, BufferError):  # (no buffer of its own: nothing to hold)
                        pass
                if isinstance(obj, ctypes.Array):  # ctypes.resize ignores exports
                    movable = (obj, obj, ctypes.addressof(obj), 0)  # (ctypes.resize only grows)
                elif owner is not None:  # ndarray.resize(refcheck=False) ignores them too
                    # (its size too: a shrink reallocates in place, same address, and frees the registered tail)
                    movable = (obj, owner, _address_of(owner), owner.nbytes)
                elif isinstance(root, ctypes.Array):  # under a view (np.ctypeslib.as_array): the same as itself
                    movable = (obj, root, ctypes.addressof(root), 0)
                elif hasattr(root, "data_ptr") and hasattr(root, "untyped_storage"):  # tensor.numpy(): as the tensor
                    storage = root.untyped_storage()
                    keep += (storage,)
                    movable = (obj, storage, storage.data_ptr(), 0)
        except BaseException:
            self._core.deregister_region(rid)
            raise
        self._regs[rid] = m
        self._keep[rid] = keep
        if movable is not None:
            self._movable[rid] = movable
            self._index_movable()
        return Registration(rid, m, self.name)

    def _index_movable(self) -> None:
        with self._index_lock:
            spans = sorted((self._regs[rid].addr, self._regs[rid].addr + self._regs[rid].nbytes, rid)
                           for rid in tuple(self._movable) if rid in self._regs)
            by_obj: dict[int, tuple[object, list[int]]] = {}
            for rid, (obj, *_rest) in tuple(self._movable.items()):
                by_obj.setdefault(id(obj), (obj, []))[1].append(rid)
            self._movable_index = (tuple(a for a, _, _ in spans), tuple((e, rid) for _, e, rid in spans),
                                   max((e - a for a, e, _ in spans), default=0), by_obj)

    def _check_moved(self, local, m: Mem) -> None:
        """TransportError if ``local`` (given as ``m``) is, or lies in, a registered object whose memory moved."""
        if not self._movable:  # (the usual case: nothing registered can move)
            return
        # Only the registrations that ``local`` is, or that its range overlaps, found by bisection (a scan of them all
        # cost microseconds per transfer with tens of registered tensors).  (The index is replaced whole, and a
        # registration gone meanwhile is skipped: register/deregister may run on another thread.)
        starts, spans, widest, by_obj = self._movable_index
        end = m.addr + m.nbytes
        rids = [spans[k][1] for k in range(bisect.bisect_right(starts, m.addr - widest), bisect.bisect_left(starts, end))
                if m.addr < spans[k][0]]  # (a start below ``end``: the range bisected)
        same = by_obj.get(id(local))
        if same is not None and same[0] is local:
            rids += same[1]
        for rid in rids:
            reg = self._regs.get(rid)
            mv = self._movable.get(rid)
            if reg is None or mv is None:
                continue
            obj, holder, addr, size = mv
            now = _address_of(holder)
            if size and now == addr and _size_of(holder) < size:  # shrunk in place: the registered tail was freed
                raise TransportError(
                    f"region {rid} of transport {self.name}: the memory of the {type(obj).__name__} registered "
                    f"at {reg.addr:#x} ({reg.nbytes} bytes) shrank from {size} to {_size_of(holder)} bytes: resized "
                    "since register(), so the registered memory was freed.  Nothing was posted; deregister it and "
                    "register the object again")
            if now != addr:
                raise TransportError(
                    f"region {rid} of transport {self.name}: the memory of the {type(obj).__name__} registered "
                    f"at {reg.addr:#x} ({reg.nbytes} bytes) moved from {addr:#x} to {now:#x}: resized since "
                    "register() (or moved to shared memory: share_memory_()), so the registered memory was freed.  "
                    "Nothing was posted; deregister it and "
                    "register the object again")

    def deregister(self, reg: Registration) -> None:
        """Deregister; refused (TransportError) while the backend may still touch the memory: a transfer over
        it not released yet or released without evidence, a passive session whose offer lies in it (or such an
        offer held past its session), or (for an engine's pool) a slot that a session leases or that is
        quarantined.  Sessions over other memory do not block it.  Keep the memory alive until then."""
        if not isinstance(reg, Registration):
            raise InvalidArgument("reg", f"expected the Registration register() returned, got {type(reg).__name__}")
        if reg.transport != self.name or self._regs.get(reg.region_id) != reg.mem:
            # (region ids restart at 1 in every transport: another's would deregister one of ours)
            raise InvalidArgument("reg", f"region {_shown(reg.region_id)} of transport {_shown(reg.transport)} is not a "
                                         f"live registration of this transport ({self.name!r})")
        obj = self._keep.get(reg.region_id)
        if isinstance(obj, _core.BufferPool):
            st = obj.stats()
            if st["leased"] or st["quarantined"]:
                raise TransportError(f"deregister: the pool registered as region {reg.region_id} has {st['leased']} "
                                     f"leased and {st['quarantined']} quarantined slots (sessions hold them, or "
                                     "their quiescence is unknown): keep it registered and alive")
        self._core.deregister_region(reg.region_id)
        if self._movable.pop(reg.region_id, None) is not None:  # (before _regs: _check_moved finds every movable one's Mem)
            self._index_movable()
        self._regs.pop(reg.region_id, None)
        kept = self._keep.pop(reg.region_id, None)
        for held in kept[1:] if isinstance(kept, tuple) else ():
            if isinstance(held, memoryview):
                held.release()  # the buffer (and the one under it) may be resized again

    def metadata(self) -> bytes:
        """This agent's metadata (after registering): ship it to peers, who call add_peer()."""
        return self._core.metadata()

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata (its ``metadata()``); returns the peer's name, what transfers name it by.
        A peer restarted under the same name (a new agent): ``remove_peer`` the old one first, as NIXL refuses
        a new agent's metadata under a name it holds (TransportError); loading the same metadata again is fine."""
        return self._core.add_peer(_check_bytes("metadata", metadata, "the peer's metadata as bytes"))

    def remove_peer(self, peer: str) -> None:
        """Forget a peer (e.g. it died): its unfinished sessions here fail (no evidence can come)."""
        self._core.remove_peer(peer)

    # ---- transfers ---------------------------------------------------------------------------
    def _fields(self, op: str, request: int, local: Mem, peer: str, remote: Offer) -> tuple:
        """transfer()'s arguments for the core, checked (InvalidArgument names what is wrong)."""
        _request(request)
        if not isinstance(peer, str):
            raise InvalidArgument("peer", f"expected the peer's name (add_peer's answer), got {type(peer).__name__}")
        if not isinstance(remote, Offer):
            raise InvalidArgument("remote", f"expected the Offer the peer's expect() returned, got "
                                            f"{type(remote).__name__} (a bare descriptor carries no tag)")
        obj, local, m = local, mem_of(local), remote.mem
        self._check_moved(obj, local)
        if local.nbytes != m.nbytes:
            raise InvalidArgument("remote", f"{m.nbytes} bytes != local {local.nbytes} bytes")
        return (request, op, local.addr, local.nbytes, local.kind, local.device, peer, m.addr, m.kind, m.device,
                remote.tag, _ROLE_CORE[remote.role])

    def _post(self, op: str, request: int, local: Mem, peer: str, remote: Offer) -> str:
        return self._core.transfer(*self._fields(op, request, local, peer, remote))

    def transfer_batch(self, transfers) -> list:
        """Several :meth:`read` / :meth:`write` calls in one: ``transfers`` holds ``(op, request, local, peer,
        remote)`` tuples, ``op`` ``"read"`` or ``"write"``.  Each item is done exactly as that call would do it
        alone, but the batch shares its locks and engine calls and posts back to back (executors posting a
        scheduler step's transfers).  Items are independent: the list returned holds, per item, the result
        string that call returns or the exception it would have raised (a refusal of one item changes nothing
        for the others; a second item of one request is refused like a second call)."""
        what = f"expected a sequence of (op, request, local, peer, remote) tuples, got {type(transfers).__name__}"
        if isinstance(transfers, (str, bytes, bytearray, memoryview)) or not hasattr(transfers, "__iter__"):
            raise InvalidArgument("transfers", what)
        if hasattr(transfers, "data_ptr") and hasattr(transfers, "device"):  # (mem_of's test for a tensor)
            # a tensor's items are tensors, never tuples; and iter() of one whose storage was freed or shrunk under
            # it raised torch's bare RuntimeError ("setStorage: ... out of bounds")
            raise InvalidArgument("transfers", what)
        try:  # (a 0-d numpy array has __iter__ and refuses it with a TypeError)
            items = iter(transfers)
        except TypeError:
            raise InvalidArgument("transfers", what) from None
        out: list = []
        fields: list = []
        where: list[int] = []
        for i, t in enumerate(items):
            try:
                if not isinstance(t, tuple) or len(t) != 5:
                    raise InvalidArgument("transfers", f"item {i}: expected (op, request, local, peer, remote), "
                                                       f"got {_shown(t):.80}")
                op = t[0]
                if not isinstance(op, str) or op not in ("read", "write"):  # (a numpy array: a bare ValueError)
                    raise InvalidArgument("transfers", f"item {i}: op must be 'read' or 'write', got {_shown(op):.40}")
                fields.append(self._fields(*t))
                where.append(i)
                out.append(None)
            except (InvalidArgument, TransportError) as e:
                out.append(e)
        for i, r in zip(where, self._core.transfer_batch(fields)):
            out[i] = r
        return out

    def read(self, request: int, local: Mem, peer: str, remote: Offer) -> str:
        """Active READ: the peer's offered range -> ``local``.  Applies ``expose`` and posts.

        Returns ``"Posted"``, ``"CompletedInPost"`` (already Quiesced) or ``"CancelledBeforePost"`` (the
        session was cancelled, or the peer stopped this offer, during the call and before the post:
        Quiesced(cancelled)).  A session already cancelled when the call begins raises IllegalTransition.
        A bad descriptor raises TransportError before anything is exposed (the session stays Advertised), and
        so does an op that a role refuses (DESIGN §9): a READ is a receiver session's, of a sender's offer.
        """
        return self._post("read", request, local, peer, remote)

    def write(self, request: int, local: Mem, peer: str, remote: Offer) -> str:
        """Active WRITE: ``local`` -> the peer's offered range.  Same contract as :meth:`read`; a WRITE is a sender
        session's, to a receiver's offer."""
        return self._post("write", request, local, peer, remote)

    def forgo(self, request: int, peer: str, offer: Offer) -> None:
        """This side will never post ``offer`` (``peer``'s, for ``request``): call it when dropping an offer
        unposted (the session was cancelled first).  A stop the peer sent for it, or sends later, is then
        answered without being remembered; otherwise it is remembered until a later session of the id
        (``stats().remembered_stops``).  Idempotent."""
        _request(request)
        if not isinstance(offer, Offer):
            raise InvalidArgument("offer", f"expected the Offer the peer's expect() returned, got "
                                           f"{type(offer).__name__}")
        self._core.forgo(request, peer, offer.tag)

    def expect(self, request: int, peer: str, local) -> Offer:
        """Passive side: ``local`` (a registered range; pool memory must lie in the session's slot) is what
        ``peer`` will READ from or WRITE to.  Applies ``expose`` and returns the :class:`Offer` to ship to
        ``peer`` (``offer.to_bytes()``); only then may it post.  The offer carries the session's role (None on a
        bare transport), which the peer's read / write checks.  The peer's "done" for this offer's tag
        completes the session; cancel sends "stop" and waits for its "quiesced"."""
        _request(request)
        m = mem_of(local)
        self._check_moved(local, m)
        tag, role = self._core.expect(request, peer, m.addr, m.nbytes, m.kind, m.device)
        return Offer(m, tag, _ROLE_OF_CORE[role])

    # ---- lifetime and counters ------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the progress thread; unfinished sessions of this transport fail.  Idempotent."""
        self._core.stop()

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> TransportStats:
        return TransportStats(**self._core.stats())

    def progress_stats(self) -> dict:
        """The progress thread's counters: ``passes``, ``status_polls``, ``completions``, ``failures``,
        ``notifications``, ``bad_notifications``, ``poll_errors`` (a backend call threw) and ``sink_errors``
        (a handler of its events threw: caught, the thread went on)."""
        return self._core.progress_stats()

    def recent_failures(self) -> list[TransportFailure]:
        """The last 64 transfers the backend failed, oldest first, as ``(request, reason)``: what NIXL (or the
        loopback's copy) said, each with ``.serial``, the failed session's (:class:`TransportFailure`: compare it
        with ``engine.info(request).serial``).  The engine's ``fail`` event carries no text; look the reason up
        here."""
        return [TransportFailure(*f) for f in self._core.recent_failures()]

    def fault_stats(self) -> dict | None:
        return self._core.fault_stats()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Poll the engine until this transport holds no active or passive entry and no release
        awaits its retry (tests, shutdown).  The transitions its polls drain are returned by the engine's next
        poll(); an on_terminate error there raises out of the wait (TerminateCallbackError, that poll's transitions
        on it), as out of a poll()."""
        import time

        from .engine import check_seconds

        deadline = time.monotonic() + check_seconds("timeout", timeout)
        while True:
            s = self._core.stats()
            if s["active"] == 0 and s["passive"] == 0 and s["unreleased"] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            # (the transitions go back to the next poll(); a bare _core.Engine has no drain: its owner drains it)
            drain = getattr(self.engine, "_drain_keeping", None)
            if drain is not None:
                drain(0.01)
            else:
                time.sleep(0.001)


def connect_all(*transports: _Transport) -> None:
    """Exchange agent metadata between every pair of ``transports`` (all in this process): afterwards each
    can transfer to, and be notified by, every other."""
    for i, t in enumerate(transports):  # (a non-transport raised a bare AttributeError, naming no argument)
        if not isinstance(t, _Transport):
            raise InvalidArgument("transports", f"item {i}: expected a transport, got {type(t).__name__}")
    metas = [t.metadata() for t in transports]
    for i, t in enumerate(transports):
        for j, meta in enumerate(metas):
            if i != j:
                t.add_peer(meta)


UNSAFE_ENV = "KV_LIFECYCLE_ALLOW_UNSAFE"  # "1": the test-only negative controls may be switched on


def _faults_dict(faults) -> dict | None:
    if faults is None:
        return None
    if not isinstance(faults, Faults):
        raise InvalidArgument("faults", f"expected a Faults or None, got {type(faults).__name__}")
    return asdict(faults)


def _view_chain_end(obj):
    """Where ``obj``'s chain of views (memoryviews' ``.obj``, numpy arrays' ``.base``) ends, as (owner, root):
    (the array, None) at a numpy array that owns the memory, whose ``resize(refcheck=False)`` reallocates it
    whatever views or buffer exports of it exist, leaving them dangling; (None, the object) at another object whose
    memory they all name (a bytearray, an mmap, a ctypes array, the tensor under ``tensor.numpy()``), which a numpy
    array made over its buffer holds no export of (``np.ndarray(buffer=...)``, ``np.memmap``: the bytearray can be
    resized, the mmap closed, under every view of it); (None, None) where there is neither (``obj`` is no view, or
    the chain is cut)."""
    o = obj
    for _ in range(64):
        if isinstance(o, memoryview):
            nxt = o.obj
        elif type(o).__module__ == "numpy" and hasattr(o, "__array_interface__") and hasattr(o, "flags"):
            if o.flags.owndata:
                return o, None
            nxt = o.base
        else:
            return None, (None if o is obj else o)
        if nxt is None:
            return None, None
        o = nxt
    return None, None


def _address_of(holder) -> int:
    """Where the memory of a movable registration's holder is now: a tensor storage, a numpy array, a ctypes object."""
    if hasattr(holder, "data_ptr"):
        return holder.data_ptr()
    if hasattr(holder, "__array_interface__"):
        return holder.__array_interface__["data"][0]
    return ctypes.addressof(holder)


def _size_of(holder) -> int:
    """How many bytes the memory of a movable registration's holder spans now (see _address_of)."""
    if hasattr(holder, "data_ptr"):
        return holder.nbytes()
    if hasattr(holder, "__array_interface__"):
        return holder.nbytes
    return ctypes.sizeof(holder)


def _pin_cpu_storage(storage) -> bool:
    """Make a CPU tensor storage non-resizable: a uint8 alias of it shared with numpy, which is how torch
    itself keeps a numpy view's memory in place (``tensor.numpy()`` clears the storage's resizable flag, for
    every dtype and also under requires_grad, as the alias has neither).  resize_() then raises instead of
    freeing memory that a transfer may still touch.  False where torch has no numpy (torch does not require
    it): the registration is then checked on use instead, like a CUDA tensor's."""
    import torch

    alias = torch.empty(0, dtype=torch.uint8)
    alias.set_(storage)
    try:
        alias.numpy()
    except (RuntimeError, ImportError):  # "Numpy is not available"
        return False
    return True


def _request(request) -> int:
    """A request id for the core: an int in [0, 2**64), not a bool (InvalidArgument names it)."""
    if isinstance(request, bool) or not isinstance(request, int) or not 0 <= request < 1 << 64:
        raise InvalidArgument("request", f"expected an id in [0, 2**64), got {_shown(request):.40}")
    return request


def _ucx_params(params) -> list[tuple[str, str]]:
    """NixlTransport's ``ucx_params``: a dict of str -> str (InvalidArgument names a bad one)."""
    if params is None:
        return []
    if not isinstance(params, dict):
        raise InvalidArgument("ucx_params", f"expected a dict of str -> str, got {type(params).__name__}")
    for k, v in params.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument("ucx_params", f"expected str -> str, got {_shown(k):.40} -> {_shown(v):.40}")
        if "\0" in k or "\0" in v:  # (they go to NIXL as C strings, cut at a NUL)
            raise InvalidArgument("ucx_params", f"{k!r:.40} -> {v!r:.40} holds a NUL character")
        try:  # (a lone surrogate: the core's conversion raised pybind11's bare "incompatible function arguments")
            k.encode(), v.encode()
        except UnicodeEncodeError:
            raise InvalidArgument("ucx_params", f"{k!r:.40} -> {v!r:.40} cannot be encoded as UTF-8 (a lone "
                                                "surrogate?)") from None
    return list(params.items())


def _number(name: str, v) -> float:
    """A number for the core (which checks its range): a str or None raised a bare float() error."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):  # (numpy's scalars too)
        raise InvalidArgument(name, f"expected a number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:  # an int past a double's range
        raise InvalidArgument(name, f"expected a number a double can hold, got an int of {int(v).bit_length()} bits") from None


def _resends(v) -> int:
    """``stop_resends``: an int (numpy's too), not a bool; the core checks its range."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise InvalidArgument("stop_resends", f"expected an int in [0, 64] (0: off), got {type(v).__name__}")
    if not 0 <= v <= 64:
        raise InvalidArgument("stop_resends", f"expected an int in [0, 64] (0: off), got {int(v)}")
    return int(v)


def _engine_arg(engine):
    """A transport's ``engine``: a TransferEngine (or a bare ``_core.Engine``), or None for a bare transport."""
    if engine is not None and not isinstance(engine, _core.Engine):
        raise InvalidArgument("engine", f"expected a TransferEngine or None, got {type(engine).__name__}")
    return engine


def _check_unsafe(**flags: bool) -> None:
    """The ``unsafe_*`` flags break DESIGN §3 on purpose (negative controls for tests).  They are refused
    unless $KV_LIFECYCLE_ALLOW_UNSAFE is "1", so that no production configuration can turn them on by
    accident."""
    for k, v in flags.items():
        # True or False (numpy's bool_ too); a numpy array's truth value raised a bare ValueError
        if not (isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"))):
            raise InvalidArgument(k, f"expected True or False, got {type(v).__name__}")
    on = [k for k, v in flags.items() if v]
    if on and os.environ.get(UNSAFE_ENV) != "1":
        raise InvalidArgument(on[0], f"test only (it breaks the evidence rule); set {UNSAFE_ENV}=1 to allow it")


class NixlTransport(_Transport):
    """A NIXL agent with the UCX backend, driving ``engine`` (a TransferEngine, or None for a bare
    transport).  ``unsafe_release_on_cancel`` and ``unsafe_ack_stop_at_once`` are TEST ONLY: the first
    treats release as evidence, the second answers a peer's "stop" before its own request is Done (the
    bugs that DESIGN §3 forbids), so that tests can prove they detect late writes on each side.

    ``stop_resends`` (0: off) and ``stop_resend_delay`` (seconds): a cancelled passive session (its stop or the
    peer's answer may be lost) has its stop sent again while it waits (CancelRequested: the answer ends it Quiesced)
    and, once it ended Poisoned without evidence, after (the answer recovers its quarantined slot): up to that many
    times per session in all, the first that long after the sweep found it cancelled, each gap twice the one before
    (at most 10 s).  The same for :class:`LoopbackTransport`.

    ``capi_path`` is the ``libnixl_capi.so`` to load; without it, :func:`nixl_capi_path`'s
    (``$KV_LIFECYCLE_NIXL_CAPI``, else the wheel's).  A :class:`NixlUnavailable` names which of the three it was.

    Before its agent starts UCX it prepares CUDA support: for the nixl-cu12 wheel's NIXL it makes the CUDA 12
    runtime loadable (:func:`cuda12_runtime`), and where the CUDA driver loads it sets the
    :data:`UCX_CUDA_DEFAULTS` that the environment does not already set, for the whole process and its
    children (:func:`ucx_cuda_defaults`)."""

    def __init__(self, engine, name: str, *, capi_path: str | None = None, faults: Faults | None = None,
                 unsafe_release_on_cancel: bool = False, ucx_params: dict[str, str] | None = None,
                 tick: float = 0.001, unsafe_ack_stop_at_once: bool = False, stop_resends: int = 8,
                 stop_resend_delay: float = 0.1):
        self._refuse_reinit()
        _check_unsafe(unsafe_release_on_cancel=unsafe_release_on_cancel, unsafe_ack_stop_at_once=unsafe_ack_stop_at_once)
        params, tick, faults_d = _ucx_params(ucx_params), _number("tick", tick), _faults_dict(faults)  # before NIXL loads
        resends, resend_delay = _resends(stop_resends), _number("stop_resend_delay", stop_resend_delay)
        engine = _engine_arg(engine)
        if capi_path is not None and not isinstance(capi_path, (str, os.PathLike)):  # (an int was taken as an fd)
            raise InvalidArgument("capi_path", f"expected a path to libnixl_capi.so, got {type(capi_path).__name__}")
        try:  # (capi_path wins over $KV_LIFECYCLE_NIXL_CAPI, which wins over the wheel's; errors say which it was)
            path, source = (os.fsdecode(capi_path), "the capi_path argument") if capi_path else _capi_path_and_source()
        except TypeError as exc:  # (an __fspath__ that returns neither str nor bytes)
            raise InvalidArgument("capi_path", str(exc)) from None
        if "\0" in path:  # (dlopen takes a C string: "libnixl_capi.so\0junk" loaded libnixl_capi.so)
            raise InvalidArgument("capi_path", f"{path!r:.80} holds a NUL character")
        try:  # (the core takes bytes: a str holding an undecodable file name's surrogates was a bare TypeError)
            raw = os.fsencode(path)
        except UnicodeEncodeError:  # (a lone surrogate that no file name decodes to)
            raise InvalidArgument("capi_path", f"{path!r:.80} is not a file name this system can encode") from None
        self._wheel = _is_wheel_capi(path)  # (the library the core loads: a path given is never overridden there)
        if self._wheel:
            cuda12_runtime()  # before UCX starts: the wheel's UCX loads its CUDA module only if libcudart.so.12 does
        ucx_cuda_defaults()
        core = _core._Transport.nixl(engine, name, raw, unsafe_release_on_cancel, faults_d, params, False, tick,
                                     unsafe_ack_stop_at_once, source, resends, resend_delay)
        super().__init__(core, engine, faults)

    def _refused_hint(self, m: Mem) -> str:
        return f"cannot register CUDA memory; {_vram_hint(self._wheel)}" if m.kind == "vram" else ""


class LoopbackTransport(_Transport):
    """In-process transport with the same interface: a worker thread copies the bytes (optionally
    paced to ``bytes_per_second``); agents of one process find each other by name."""

    def __init__(self, engine, name: str, *, bytes_per_second: float = 0.0, latency: float = 0.0,
                 faults: Faults | None = None, unsafe_release_on_cancel: bool = False, tick: float = 0.001,
                 unsafe_ack_stop_at_once: bool = False, stop_resends: int = 8, stop_resend_delay: float = 0.1):
        self._refuse_reinit()
        _check_unsafe(unsafe_release_on_cancel=unsafe_release_on_cancel, unsafe_ack_stop_at_once=unsafe_ack_stop_at_once)
        core = _core._Transport.loopback(_engine_arg(engine), name, _number("bytes_per_second", bytes_per_second),
                                         _number("latency", latency),
                                         unsafe_release_on_cancel, _faults_dict(faults),
                                         _number("tick", tick), unsafe_ack_stop_at_once, _resends(stop_resends),
                                         _number("stop_resend_delay", stop_resend_delay))
        super().__init__(core, engine, faults)


assert issubclass(NixlUnavailable, TransportError)
