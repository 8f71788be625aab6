"""Helpers shared by the transport tests (no tests here): engine+transport pairs, patterns, checksums,
and the peer process (multiprocessing spawn; metadata shipped over a pipe)."""

from __future__ import annotations

import os
import signal
import random
import shutil
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from lifecycle import State, TransferEngine, TransportError, _core
from lifecycle.transport import LoopbackTransport, Mem, NixlTransport, Offer, nixl_available, pool_slot

HAVE_NIXL = nixl_available()
needs_nixl = pytest.mark.skipif(not HAVE_NIXL, reason="nixl-cu12 not installed (pip install nixl-cu12==1.5.1)")

KiB, MiB = 1024, 1024 * 1024
SIZES = [1 * KiB, 64 * KiB, 1 * MiB, 16 * MiB]
TERMINAL = (State.Quiesced, State.Poisoned)


def pattern(n: int, seed: int) -> bytes:
    """Never-zero bytes, different per seed (so landed bytes are countable)."""
    block = bytes((b % 255) + 1 for b in random.Random(seed).randbytes(4096))
    return (block * (n // 4096 + 1))[:n]


def crc(data) -> int:
    return zlib.crc32(data)


class Side:
    """One engine with a buffer pool, and its transport (pool registered)."""

    def __init__(self, name: str, kind: str = "nixl", slots: int = 4, slot_size: int = 16 * MiB,
                 transport_kw: dict | None = None, **engine_kw):
        engine_kw.setdefault("transfer_timeout", 10.0)
        engine_kw.setdefault("cancel_grace", 5.0)
        self.engine = TransferEngine(num_slots=slots, slot_size=slot_size, **engine_kw)
        cls = NixlTransport if kind == "nixl" else LoopbackTransport
        self.t = cls(self.engine, name, **(transport_kw or {}))
        self.reg = self.t.register(self.engine.pool)
        self.name = name

    def advertise(self, req: int, role: str, n: int, fill: bytes | int | None = None) -> Mem:
        self.engine.advertise(req, role, n)
        m = pool_slot(self.engine, req).slice(0, n)
        if fill is not None:
            self.view(req, n)[:] = fill if isinstance(fill, bytes) else bytes([fill]) * n
        return m

    def view(self, req: int, n: int) -> memoryview:
        return self.engine.pool.slot_view(self.engine.info(req).slot)[:n]

    def wait(self, req: int, timeout: float = 10.0) -> State:
        return self.engine.wait_terminal(req, timeout)

    def close(self) -> None:
        self.t.stop()


def connect(a: Side, b: Side) -> tuple[str, str]:
    """Exchange metadata; returns (a's name for b, b's name for a)."""
    b_at_a = a.t.add_peer(b.t.metadata())
    a_at_b = b.t.add_peer(a.t.metadata())
    return b_at_a, a_at_b


METADATA_HEAD = len(_core.METADATA_MAGIC) + 4  # metadata()'s envelope header: the magic, a CRC-32


def raw_metadata(t) -> bytes:
    """``t``'s agent metadata out of metadata()'s envelope (what an agent outside this library ships), its
    header checked: the magic, then the CRC-32 (zlib's) of the rest, little-endian."""
    md, head = t.metadata(), METADATA_HEAD
    assert md.startswith(_core.METADATA_MAGIC) and int.from_bytes(md[head - 4:head], "little") == zlib.crc32(md[head:])
    return md[head:]


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``code`` (dedented) in a fresh interpreter that can import these test modules; ``args`` are its
    sys.argv[1:].  A crash or a hang there (TimeoutExpired past ``timeout``) cannot take the test run down."""
    src = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", src, *args], capture_output=True, text=True, timeout=timeout)


def build_shared(out: Path, source: str, soname: str | None = None, needs: Path | None = None) -> Path:
    """Compiles C ``source`` into the shared library ``out`` (a stand-in for a system library): with
    ``soname``, and linked against ``needs`` (recorded as NEEDED by its soname, found by no path)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler builds the stand-ins (the C++ build needs one too)"
    src = out.with_name(out.name + ".c")
    src.write_text(source)
    cmd = [cc, "-shared", "-fPIC", "-o", str(out), str(src)]
    if soname:
        cmd.append(f"-Wl,-soname,{soname}")
    if needs is not None:
        cmd += [f"-L{needs.parent}", f"-l:{needs.name}"]
    subprocess.run(cmd, check=True)
    return out


def loader_finds(soname: str) -> bool:
    """True when a fresh interpreter's dlopen finds ``soname`` by name (this host has the real library)."""
    return subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({soname!r})"]).returncode == 0


def wait_for(pred, timeout: float, what: str, poll=None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if poll is not None:
            poll()
        time.sleep(0.002)


# ---- the peer process -----------------------------------------------------------------------------
def peer_main(conn, name: str, env: dict, slots: int, slot_size: int, engine_kw: dict) -> None:
    """A peer in its own process, driven by commands over `conn` (a multiprocessing Pipe end)."""
    os.environ.update(env)
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet child (test process only)
    side = Side(name, "nixl", slots=slots, slot_size=slot_size, **engine_kw)
    conn.send((side.t.metadata(), side.reg.mem.to_bytes()))
    peer = side.t.add_peer(conn.recv())
    conn.send(peer)
    while True:
        cmd, *args = conn.recv()
        if cmd == "exit":
            side.close()
            conn.send("bye")
            return
        if cmd == "serve":  # passive: expose a slot; role sender (READ source) or receiver (WRITE target)
            req, role, n, seed = args
            m = side.advertise(req, role, n, pattern(n, seed) if role == "sender" else 0)
            conn.send(side.t.expect(req, peer, m).to_bytes())
        elif cmd in ("active", "active-then-die"):  # READ (role receiver) or WRITE (role sender) to an offer
            req, role, n, seed, desc = args
            m = side.advertise(req, role, n, pattern(n, seed) if role == "sender" else 0)
            remote = Offer.from_bytes(desc)
            res = (side.t.read if role == "receiver" else side.t.write)(req, m, peer, remote)
            if cmd == "active-then-die":  # SIGKILL right after the post: the transfer is cut mid-way
                os.kill(os.getpid(), signal.SIGKILL)
            conn.send(res)
        elif cmd == "wait":
            req, n, timeout = args
            st = side.wait(req, timeout)
            conn.send((st.value, side.engine.outcome(req).value, crc(side.view(req, n))))
            side.engine.terminate(req)
            side.engine.poll()
        elif cmd == "stats":
            conn.send(side.t.stats())
        else:
            conn.send(("error", f"unknown command {cmd}"))


def spawn_peer(name: str, env: dict | None = None, slots: int = 4, slot_size: int = 16 * MiB, **engine_kw):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=peer_main, args=(child, name, env or {}, slots, slot_size, engine_kw), daemon=True)
    p.start()
    return p, parent


def attach_peer(side: Side, conn, timeout: float = 60.0) -> tuple[str, Mem]:
    """Metadata exchange with a spawned peer; returns (peer name, peer pool Mem)."""
    if not conn.poll(timeout):
        raise AssertionError("peer process did not start")
    md, pool_desc = conn.recv()
    peer = side.t.add_peer(md)
    conn.send(side.t.metadata())
    conn.recv()
    return peer, Mem.from_bytes(pool_desc)


def call(conn, *msg, timeout: float = 30.0):
    conn.send(msg)
    if not conn.poll(timeout):
        raise AssertionError(f"peer did not answer {msg[0]} within {timeout}s")
    return conn.recv()


def check_deregister_beside_a_live_session(a: Side, b: Side, mode: str) -> None:
    """a is the receiver, b the sender (read: a READs from b's offer; write: b WRITEs into a's).  The passive side
    registers a buffer per request, as vLLM / SGLang executors do.  While request 1's passive session is live (its
    offer out, the peer not posted yet), request 2's buffer, beside it, deregisters once request 2 is done; request
    1's is refused, naming request 1, its state and its range.  Control: the peer then really moves request 1's
    bytes through that buffer (what a deregistration and free there would have turned into a use-after-free), and
    once that session is done its buffer deregisters too.  Connects a and b (after registering: NIXL ships the
    registrations in the metadata)."""
    n = 64 * KiB
    read = mode == "read"
    passive = b if read else a
    role = "sender" if read else "receiver"
    bufs = {req: bytearray(pattern(n, req)) if read else bytearray(n) for req in (1, 2)}
    regs = {req: passive.t.register(buf) for req, buf in bufs.items()}
    b_at_a, a_at_b = connect(a, b)
    at_passive, at_active = (a_at_b, b_at_a) if read else (b_at_a, a_at_b)
    offers = {}
    for req in (1, 2):
        passive.engine.advertise(req, role)  # no pool slot: the executor's own buffer
        offers[req] = passive.t.expect(req, at_passive, bufs[req])

    def post(req: int) -> None:
        if read:
            a.t.read(req, a.advertise(req, "receiver", n, 0), at_active, offers[req])
        else:
            b.t.write(req, b.advertise(req, "sender", n, pattern(n, req)), at_active, offers[req])

    post(2)
    assert a.wait(2) is State.Quiesced and b.wait(2) is State.Quiesced
    for s in (a, b):
        s.engine.terminate(2)
    wait_for(lambda: passive.t.stats().passive == 1, 5, "request 2's passive entry to end", passive.engine.poll)
    passive.t.deregister(regs[2])  # request 1's session is live, over other memory
    addr = regs[1].mem.addr
    with pytest.raises(TransportError, match=rf"\(0 transfer requests over it: 0 awaiting a retried release, 0 ended "
                                             rf"without evidence; 1 passive sessions, 0 offered ranges whose transfer "
                                             rf"ended without evidence; e\.g\. request 1, a passive session \(the peer "
                                             rf"may write or read it\), over \[{addr:#x}, \+{n}\)\)"):
        passive.t.deregister(regs[1])
    post(1)
    assert a.wait(1) is State.Quiesced and b.wait(1) is State.Quiesced
    landed = bufs[1] if not read else a.view(1, n)
    assert bytes(landed) == pattern(n, 1)  # the refused range was in use: the peer's transfer went through it
    for s in (a, b):
        s.engine.terminate(1)
    wait_for(lambda: passive.t.stats().passive == 0, 5, "request 1's passive entry to end", passive.engine.poll)
    passive.t.deregister(regs[1])
    assert passive.t.stats().registered_regions == 1  # the pool only
