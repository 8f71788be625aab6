"""docs/*.md against the code: lists a reader relies on (finding kinds, ...) name what the code has."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from lifecycle import audit

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _paragraph(text: str, start: str) -> str:
    """The paragraph of ``text`` that begins with ``start`` (up to the next blank line)."""
    i = text.index(start)
    j = text.find("\n\n", i)
    return text[i:] if j < 0 else text[i:j]


def test_audit_md_names_every_finding_kind():
    text = (DOCS / "audit.md").read_text(encoding="utf-8")
    table = _paragraph(text, "| violation (exit 1) |")
    violations = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    warnings = re.findall(r"`([a-z_]+)`", _paragraph(text, "Warnings (reported, exit 0):"))
    assert violations == list(audit.VIOLATION_KINDS)
    assert warnings == list(audit.WARNING_KINDS)


def test_audit_module_docstring_names_every_finding_kind():
    """lifecycle/audit.py's theory of operation lists the violations and warnings too (its warnings were six
    phrases, none of orphan_event, live, window_evicted, delivery_unchecked)."""
    doc = audit.__doc__
    i = doc.index("Violations (exit status 1):")
    j = doc.index("Warnings (reported, exit 0")
    k = doc.index("\n\n", j)
    assert [v for v in audit.VIOLATION_KINDS if f"``{v}``" not in doc[i:j]] == []
    assert re.findall(r"``([a-z_]+)``", doc[j:k]) == list(audit.WARNING_KINDS)


def _cpp_constants(path: Path) -> dict[str, int]:
    """``constexpr std::int64_t kName = 1'000;`` lines of a C++ header, as {name: value}."""
    text = path.read_text(encoding="utf-8")
    return {m[1]: int(m[2].replace("'", "")) for m in re.finditer(r"constexpr std::int64_t (k\w+) = ([\d']+);", text)}


def _ns(value: int) -> str:
    return f"{value // 1_000_000} ms" if value % 1_000_000 == 0 else f"{value // 1_000} µs"


def test_engine_md_clock_bullet_quotes_the_tsc_line_rule():
    """The re-anchoring rule's numbers, and that a line far ahead steps back (a reading goes back)."""
    k = _cpp_constants(DOCS.parent / "cpp" / "include" / "lifecycle" / "tsc_line.hpp")
    bullet = _paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "* **Clock**")
    bullet = " ".join(bullet[:bullet.find("\n* ")].split())  # up to the next bullet, one line
    assert f"every ≤ {_ns(k['kMaxInterval'])}" in bullet
    assert f"doubles from {_ns(k['kFirstInterval'])}" in bullet
    assert f"within {_ns(k['kQuiet'])}" in bullet
    assert f"error over {_ns(k['kRebase'])}" in bullet
    assert f"ahead by at most {_ns(k['kStepLimit'])}" in bullet and "steps back" in bullet


def _flags(program: Path) -> tuple[set[str], set[str]]:
    """(every flag, the required ones) of a script's argparse ``add_argument`` lines."""
    found, required = set(), set()
    for m in re.finditer(r'add_argument\("(--[a-z-]+)"([^\n]*)', program.read_text(encoding="utf-8")):
        found.add(m[1])
        if "required=True" in m[2]:
            required.add(m[1])
    return found, required


def test_collectives_md_runs_the_mpi_programs_with_their_flags():
    """Every flag quoted with a tests/mpi program is one it takes; a command line naming the program by its
    path holds the flags it requires (``seed_bugs.py --mode raw`` alone is an argparse error: --bug)."""
    text = (DOCS / "collectives.md").read_text(encoding="utf-8")
    mpi = DOCS.parent / "tests" / "mpi"
    spans = re.findall(r"`([^`\n]*\b(\w+)\.py\b[^`\n]*)`", text)
    checked = told = 0
    for span, name in spans:
        if not (mpi / f"{name}.py").exists():
            continue
        flags, required = _flags(mpi / f"{name}.py")
        used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", span.split(f"{name}.py", 1)[1]))
        assert used <= flags, (span, used - flags)
        if f"tests/mpi/{name}.py" in span:
            assert required <= used, (span, required - used)
            checked += 1
            # the prose right after it that says which flags are required names all of them (it said "`--bug` is
            # required" of seed_bugs.py, which refuses to run without --mode too)
            after = text[text.index(span) + len(span):].split(")", 1)[0]
            said = re.search(r"\(((?:`--[a-z-]+`(?:, | and )?)+) (?:is|are) required", after)
            if said:
                assert set(re.findall(r"`(--[a-z-]+)`", said[1])) == required, (said[0], required)
                told += 1
    assert checked >= 1 and told >= 1  # (the seed-bug command line, and what it says is required)


def test_engine_md_bindings_paragraph_names_every_binding_file_and_module_call():
    """Each cpp/bindings/*.cpp concept, and every call module.cpp makes that is not a register_* of one."""
    bindings = DOCS.parent / "cpp" / "bindings"
    text = (DOCS / "engine.md").read_text(encoding="utf-8")
    para = " ".join(_paragraph(text, "`module.cpp` only calls").split())
    concepts = [f.stem.removeprefix("bind_") for f in sorted(bindings.glob("*.cpp")) if f.stem != "module"]
    assert len(concepts) >= 10  # (the glob found the files)
    missing = [c for c in concepts if not re.search(rf"\b{c}\b", para)]
    assert not missing, missing
    calls = re.findall(r"bindings::(\w+)\(m\)", (bindings / "module.cpp").read_text(encoding="utf-8"))
    others = [c for c in calls if not (c.startswith("register_") and c.removeprefix("register_") in concepts)]
    assert all(f"`{c}`" in para for c in others), others


def test_poll_symmetric_cost_is_quoted_as_it_is_sent():
    """docs/collectives.md and poll_symmetric's docstring give its payload per rank; the docstring said
    ``2 * len(requests)`` int64, one short of what it sends (the poll-error flag comes first)."""
    from lifecycle import TransferEngine, collectives
    from lifecycle.demo_worker import SoloGroup

    sent = []

    class _Recording(SoloGroup):
        def allgather_ints(self, values, *, site=None):
            sent.append(len(values))
            return super().allgather_ints(values, site=site)

    eng = TransferEngine()
    for r in (1, 2, 3):
        eng.advertise(r, "sender")
    collectives.poll_symmetric(eng, _Recording(), [1, 2, 3])
    assert sent == [1 + 2 * 3]
    quoted = "1 + 2 * len(requests)"
    assert quoted in (DOCS / "collectives.md").read_text(encoding="utf-8")
    assert quoted in " ".join(collectives.poll_symmetric.__doc__.split())


def test_engine_md_tombstones_bullet_says_when_an_id_can_be_advertised_again():
    """Review (session 26, ha): the bullet told an on_terminate that advertises its own id again (DuplicateRequest)
    to "reuse it after poll()", and never said that advertise refuses a terminated id at all.  After poll() the
    id is still refused, like any terminated id, until its tombstone is evicted.  Behaviour pinned here, with its
    control (tombstones=0: the id is free once the notice was delivered), and the bullet checked to say it."""
    from lifecycle import DuplicateRequest, TransferEngine

    for tombstones in (1 << 16, 0):
        refused = []

        def again(r):
            try:
                e.advertise(r, "sender")
            except DuplicateRequest:
                refused.append(r)

        e = TransferEngine(tombstones=tombstones, on_terminate=again)
        e.advertise(1, "sender")
        e.expose(1)
        e.terminate(1)
        e.complete(1)
        e.poll()
        assert refused == [1]  # in the callback: held until it returned, whatever the window
        if tombstones:
            try:
                e.advertise(1, "sender")
                raise AssertionError("a terminated id in the tombstone window was advertised again")
            except DuplicateRequest:
                pass
        else:
            e.advertise(1, "sender")
    bullet = _paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "* **Tombstones**")
    bullet = " ".join(bullet[:bullet.find("\n* ")].split())
    assert "reuse it after `poll()`" not in bullet
    assert "`advertise` of the id answers `DuplicateRequest`: a request id can be advertised again only once its " \
           "tombstone is evicted" in bullet


def test_engine_md_health_bullet_says_who_marks_the_backend_unhealthy():
    """Review (session 26, ha): the Health bullet said health turns unhealthy "when the transport reported the
    backend unhealthy", but no transport calls set_backend_health (only the executor can: the demo does); an
    executor waiting for NixlTransport to flip health on a dead backend waited for nothing.  Behaviour pinned (a
    transport's failed transfers leave backend health alone; the executor's call flips it and back) and the
    bullet checked to name the call."""
    from lifecycle import LoopbackTransport, TransferEngine

    e = TransferEngine()
    a, b = LoopbackTransport(e, "docs-health-a"), LoopbackTransport(None, "docs-health-b")
    try:
        a.add_peer(b.metadata())
        a.remove_peer("docs-health-b")  # a peer lost: its sessions fail, the backend stays "healthy"
        assert e.health().backend_healthy and e.health().healthy
    finally:
        a.stop()
        b.stop()
    e.set_backend_health(False, "peer lost")
    assert e.health().reasons == ("backend: peer lost",)
    e.set_backend_health(True, "")
    assert e.health().healthy
    bullet = _paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "* **Health**")
    bullet = " ".join(bullet[:bullet.find("\n* ")].split())
    assert "when the transport reported the backend unhealthy" not in bullet
    assert "`set_backend_health(False, reason)`" in bullet and "the transports never do" in bullet


def test_engine_md_wait_spin_latencies_are_the_cited_measurements():
    """Review (session 26, hk): the Records bullet quoted completion -> poll() as "p50 14-20 us / p99 58-100 us with a
    50 us spin to p50 7 us / p99 28-35 us with 250 us" and cited docs/transport-measurements.md, session 3, whose
    table holds none of those ranges.  Every latency range the sentence quotes must be in that table."""
    bullet = _paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "* **Records**")
    bullet = " ".join(bullet[:bullet.find("\n* ")].split())
    sentence = bullet[bullet.index("Spinning through"):bullet.index("A waiter that wants no spinning")]
    assert "transport-measurements.md, session 3" in sentence
    table = _paragraph((DOCS / "transport-measurements.md").read_text(encoding="utf-8"),
                       "| | session 2 | session 3, logs off |")
    quoted = re.findall(r"p(?:50|99) ([\d.–]+) µs", sentence)
    assert len(quoted) >= 4, sentence  # (the pattern found the quoted ranges)
    missing = [q for q in quoted if f"{q} µs" not in table]
    assert not missing, missing


def test_audit_md_memory_bounds_are_counted_and_quoted_as_the_code_has_them():
    """Review (session 26, hk): the list said "Two more bounds" over three bullets (Quoted values was added
    between the two) and closed with "Both bounds".  The count word matches the bullets, and each bullet's
    number is its constant's in lifecycle/audit.py."""
    text = (DOCS / "audit.md").read_text(encoding="utf-8")
    intro = text[:text.index(" more bounds keep memory")].rsplit("\n", 1)[1]
    bullets = re.findall(r"^- \*\*", _paragraph(text, "- **Merging.**"), re.M)
    words = {2: "Two", 3: "Three", 4: "Four"}
    assert intro == words[len(bullets)], (intro, len(bullets))
    after = text[text.index("- **Merging.**"):]
    after = after[after.index("\n\n") + 2:].split("\n", 1)[0]
    assert not after.startswith("Both ") or len(bullets) == 2, after
    flat = " ".join(_paragraph(text, "- **Merging.**").split())
    assert f"first {audit._LOOKAHEAD} non-blank lines only (`_LOOKAHEAD`)" in flat
    assert f"to {audit._MAX_QUOTED} characters (`_MAX_QUOTED`" in flat
    assert f"first {audit._MAX_TABLES} distinct values (`_MAX_TABLES`)" in flat
    assert f"longer than {audit._MAX_KEPT_TABLE} characters is remembered by its digest (`_MAX_KEPT_TABLE`)" in flat


def test_the_waits_that_poll_keep_their_transitions_for_the_next_poll():
    """``wait_terminal`` and a transport's ``wait_idle`` poll the engine while they wait: the transitions of every
    session those polls drain were logged, never returned, so an executor that learns of ended sessions from
    ``poll()``'s transitions (README's loop) and waits on one request, or waits for its transport at shutdown, never
    saw the others end: they stayed Quiesced, their slots leased, for good.  The next poll() returns them now (seen
    failing before: [] after the wait), and both docs say so.  Control: without the wait, poll() returns the same."""
    from lifecycle import TransferEngine
    from lifecycle.transport import LoopbackTransport, connect_all, pool_slot

    engine_md = " ".join((DOCS / "engine.md").read_text(encoding="utf-8").split())
    transport_md = " ".join((DOCS / "transport.md").read_text(encoding="utf-8").split())
    assert "the next `poll()` (or `drain()`) returns them, before its own" in engine_md
    assert "returned by the engine's next `poll()`, before its own" in transport_md
    # and a callback's error in those polls raises out of the wait (tests/test_poll_health.py)
    assert "raises in those polls ends the wait as it ends a `poll()`" in engine_md
    assert "a callback's error there ends the wait as it ends a `poll()`" in transport_md
    assert "| `wait_idle(timeout=5.0) -> bool` |" in transport_md

    def ended(transitions):
        return [t.request for t in transitions if t.to_state.value == "Quiesced"]

    for wait in (False, True):
        e = TransferEngine()
        for r in (1, 2):
            e.advertise(r, "receiver")
            e.expose(r)
        e.complete(2)  # the transport's DONE for 2
        done_1 = threading.Timer(0.05, e.complete, (1,))  # 1's comes while the executor waits for it
        done_1.start()
        if wait:
            assert e.wait_terminal(1, 5).value == "Quiesced"
        done_1.join()
        assert ended(e.poll()) == [2, 1]
        assert e.poll() == []  # returned once
    for wait in (False, True):  # wait_idle: a paced transfer keeps it polling while 2's end is queued
        ea, eb = TransferEngine(num_slots=1, slot_size=1 << 20), TransferEngine(num_slots=1, slot_size=1 << 20)
        na, nb = f"docs-a{int(wait)}", f"docs-b{int(wait)}"  # (a loopback name is the process's while it lives)
        with LoopbackTransport(ea, na) as a, LoopbackTransport(eb, nb, bytes_per_second=4e6) as b:
            a.register(ea.pool)
            b.register(eb.pool)
            connect_all(a, b)
            ea.advertise(1, "sender", 1 << 20)
            offer = a.expect(1, nb, pool_slot(ea, 1))
            eb.advertise(1, "receiver", 1 << 20)
            assert b.read(1, pool_slot(eb, 1), na, offer) == "Posted"  # about 250 ms
            eb.poll()
            eb.advertise(2, "receiver")  # a session of the executor's own data path
            eb.expose(2)
            eb.complete(2)
            if wait:
                assert b.wait_idle(10) is True
            got = ended(eb.poll())
            assert 2 in got and got.count(2) == 1 and 2 not in ended(eb.poll())


def _number(text: str) -> float:
    return float(text.strip().removesuffix(" s"))


def test_demo_md_options_table_and_fault_rates_are_the_demo_defaults():
    """docs/demo.md writes the demo's defaults (its Options table) and its fault rates (the Faults paragraph) a
    second time, beside lifecycle/demo.py's parser and demo_worker.FAULT_RATES: each value quoted is the code's."""
    from lifecycle.demo import parse_args
    from lifecycle.demo_worker import FAULT_RATES
    from lifecycle.transport import Faults

    text = (DOCS / "demo.md").read_text(encoding="utf-8")
    one, ranks = vars(parse_args([])), vars(parse_args(["--ranks", "2"]))
    table = _paragraph(text, "| option | default |").replace("\\|", "/")  # (`--mode read\|write`)
    rows = re.findall(r"^\| (`--[^|]*`(?:, `--[^|]*`)*) \| ([^|]*) \|", table, re.M)
    checked = 0
    for flags, default in rows:
        names = [f.split()[0].removeprefix("--").replace("-", "_") for f in re.findall(r"`(--[^`]+)`", flags)]
        m = re.fullmatch(r"(\S+) \((\S+) with ranks\)", default.strip())
        if default.strip() == "":  # (a switch)
            assert all(one[n] is False for n in names), flags
        elif m:
            assert (one[names[0]], ranks[names[0]]) == (int(m[1]), int(m[2])), flags
        else:
            values = [v.strip() for v in default.split(",")]
            assert len(values) == len(names), flags
            for n, v in zip(names, values):
                code = one[n]
                if n == "faults":
                    assert v == "none" and code == ""
                elif isinstance(code, str):
                    assert code == v, (flags, code, v)
                else:
                    assert code == _number(v), (flags, code, v)
        checked += len(names)
    assert checked >= 16, rows  # (the table was found and parsed)
    faults = " ".join(_paragraph(text, "**Faults** (`--faults`").split())
    for name, (_, p) in FAULT_RATES.items():
        assert re.search(rf"`{name}` \({p * 100:g} %", faults), (name, p)
    assert f"for {Faults().delay_s * 1000:g} ms longer" in faults


def test_collectives_md_names_every_symmetric_decision():
    """docs/collectives.md's decision table and its API line name every field of SymmetricDecisions (session 28
    added ``poisoned`` and ``terminal``: a reader of the table alone would still finalize ``quiesced``)."""
    import dataclasses

    from lifecycle.collectives import SymmetricDecisions

    text = (DOCS / "collectives.md").read_text(encoding="utf-8")
    fields = [f.name for f in dataclasses.fields(SymmetricDecisions) if f.name != "seq_no"]
    table = re.findall(r"^\| `(\w+)` \|", _paragraph(text, "| decision | rule |"), re.M)
    assert sorted(table) == sorted(fields)
    api = re.search(r"^decisions\.(\w+)((?:, \.\w+)*)", text, re.M)
    assert api and sorted([api[1], *re.findall(r"\.(\w+)", api[2])]) == sorted(fields)


def test_engine_md_lists_every_validator_code():
    """docs/engine.md's validator table names each code spec.py reports, once, and no other."""
    from lifecycle import spec

    src = Path(spec.__file__).read_text(encoding="utf-8")
    codes = set(re.findall(r'\bbad\([^,]+, "([a-z-]+)"', src))
    codes |= set(re.findall(r'Violation\([^,]+, [^,]+, "([a-z-]+)"', src))
    assert {"syntax", "unreadable", "frees-not-quiesced"} <= codes  # (the patterns still find the calls)
    table = _paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "| code | what it reports |")
    cells = re.findall(r"^\| ([^|]+) \|", table, re.M)[2:]  # (the first column, below the header)
    documented = [c for cell in cells for c in re.findall(r"`([a-z-]+)`", cell)]
    assert len(documented) == len(set(documented))
    assert set(documented) == codes


def test_readme_quotes_the_poll_budget_measurements_as_engine_md_has_them():
    """README's poll paragraph restates docs/engine.md's Bounded polls tables (it said 0.14–0.17 s for a cell of
    130–170 ms)."""
    engine_md = (DOCS / "engine.md").read_text(encoding="utf-8")
    readme = " ".join((DOCS.parent / "README.md").read_text(encoding="utf-8").split())

    def row(start: str) -> list[str]:
        line = next(ln for ln in engine_md.splitlines() if ln.startswith(start))
        return [c.strip() for c in line.strip("|").split("|")]

    def seconds(cell: str) -> str:  # "130–170 ms" -> "0.13–0.17 s", "1.9 s" stays
        if cell.endswith(" ms"):
            return "–".join(f"{int(v) / 1000:g}" for v in cell[:-3].split("–")) + " s"
        return cell

    off, json_ = row("| whole `poll()`, logs off")[3], row("| whole `poll()`, JSON lines")[3]
    assert f"one poll about {seconds(off)} with logs off and {seconds(json_)} with JSON lines" in readme
    b_off, b_json = row("| 1024, logs off |"), row("| 1024, JSON lines |")
    assert b_off[1] == b_json[1]
    median_off = f"{float(b_off[3].removesuffix(' ms')):.1f} ms"
    assert f"(here {median_off} / {b_json[3]} per poll, the same total over {b_off[1]} polls)" in readme


def test_oldest_nonterminal_is_documented_as_the_non_terminal_sessions_age():
    """docs/engine.md called ``Health.oldest_nonterminal_s`` the longest time "a live session" spent in its state, and
    Health's docstring said None "with no live session"; but ``live`` counts the Quiesced and Poisoned sessions that
    wait for their terminate, and those never count here (the engine reads the Advertised, InFlight and
    CancelRequested lists): an executor that watched this age for sessions it forgot to terminate saw None.  Behaviour
    pinned, with a control (a non-terminal session does count), and both texts checked."""
    from lifecycle import ManualClock, State, TransferEngine
    from lifecycle.engine import Health

    clock = ManualClock()
    e = TransferEngine(clock=clock)
    e.advertise(1, "sender")
    e.cancel(1)  # Quiesced(cancelled), never terminated
    clock.advance(5_000_000_000)
    h = e.health()
    assert h.live == 1 and h.counts[State.Quiesced] == 1 and h.oldest_nonterminal_s is None
    e.advertise(2, "sender")
    clock.advance(1_000_000_000)
    assert e.health().oldest_nonterminal_s == 1  # control: an Advertised session counts
    para = " ".join(_paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "`health()` returns a frozen").split())
    doc = " ".join(Health.__doc__.split())
    for text in (para, doc):
        assert "live session" not in text, text
        assert "non-terminal session (Advertised, InFlight or CancelRequested)" in text, text


def test_cancel_docstring_names_the_frees_now_call_that_exists():
    """``TransferEngine.cancel``'s docstring said "Only results with ``frees_now`` let the caller free", but a
    CancelResult has no ``frees_now`` (an executor following help() got AttributeError): the answer is
    ``cancel_frees_now(result)``, the README's call."""
    from lifecycle import CancelResult, TransferEngine, cancel_frees_now

    assert not hasattr(CancelResult.NotFound, "frees_now")
    assert cancel_frees_now(CancelResult.NotFound) and not cancel_frees_now(CancelResult.CancelRequestedInFlight)
    doc = " ".join(TransferEngine.cancel.__doc__.split())
    assert "``cancel_frees_now(result)``" in doc and "``frees_now``" not in doc, doc


def test_engine_md_timers_bullet_says_zero_turns_a_timer_off():
    """``transfer_timeout=0`` / ``cancel_grace=0`` turn the timers off, as None does (the engine reads 0 ns as no
    timer); docs/engine.md's Timers bullet did not say so (only demo.md's option table did), and an executor that
    set ``cancel_grace=0`` to Poison at once got a session that waits for ever.  Nor did it say that
    ``ManualClock.set()`` ignores an earlier reading.  Behaviour pinned, with a control (1 ns fires), and the
    bullet checked."""
    from lifecycle import ManualClock, State, TransferEngine

    for off in (0, None):
        clock = ManualClock()
        e = TransferEngine(transfer_timeout=off, cancel_grace=off, clock=clock)
        e.advertise(1, "sender")
        e.expose(1)
        e.advertise(2, "sender")
        e.expose(2)
        e.cancel(2)
        clock.advance(10**15)
        e.poll()
        assert (e.state(1), e.state(2)) == (State.InFlight, State.CancelRequested), off
    clock = ManualClock()
    e = TransferEngine(transfer_timeout=1e-9, cancel_grace=1e-9, clock=clock)  # control: the smallest timers fire
    e.advertise(1, "sender")
    e.expose(1)
    clock.advance(1)
    e.poll()
    clock.advance(1)
    e.poll()
    assert e.state(1) == State.Poisoned
    clock.set(10)
    clock.set(5)
    assert clock.now_ns() == 10
    bullet = _paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "* **Timers**")
    bullet = " ".join(bullet[:bullet.find("\n* ")].split())
    assert "`None` **or 0** turns a timer off" in bullet
    assert "`set()` to an earlier reading is ignored" in bullet


def test_engine_md_says_what_wait_terminal_raises_at_its_timeout():
    """``wait_terminal`` raises the builtin TimeoutError when the session is still live at the timeout, which is not
    a LifecycleError: an executor's shutdown that caught LifecycleError around it crashed.  engine.md named the call
    and its GIL release only.  Behaviour pinned (with the control: a terminal session's state is returned)."""
    import pytest

    from lifecycle import LifecycleError, State, TransferEngine, UnknownRequest

    e = TransferEngine()
    e.advertise(1, "sender")
    with pytest.raises(TimeoutError) as ei:
        e.wait_terminal(1, 0.01)
    assert not isinstance(ei.value, LifecycleError)
    with pytest.raises(UnknownRequest):
        e.wait_terminal(2, 0.01)
    e.cancel(1)
    assert e.wait_terminal(1, 0.01) == State.Quiesced
    para = " ".join(_paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "`TransferEngine` subclasses").split())
    assert "raises the builtin `TimeoutError` (not a `LifecycleError`)" in para
    assert "an id with no session `UnknownRequest`" in para


def test_transport_md_quotes_slice_with_its_parameters():
    """``Mem.slice`` and ``Offer.slice`` take ``(offset, nbytes)``, a length, not a Python slice's ``(start, stop)``;
    docs/transport.md quoted them as ``.slice()``, so ``m.slice(1024, 2048)`` meant for bytes [1024, 2048) named
    [1024, 3072) (inside the range: no error), and a READ into it wrote past the blocks meant.  Behaviour pinned and
    the API table checked to quote both with their parameters, as the code names them."""
    import inspect

    from lifecycle.transport import Mem, Offer

    m = Mem(4096, 4096).slice(1024, 2048)
    assert (m.addr, m.nbytes) == (4096 + 1024, 2048)
    assert Offer(Mem(4096, 4096), 7).slice(1024, 2048).mem == m
    for cls in (Mem, Offer):
        assert list(inspect.signature(cls.slice).parameters)[1:] == ["offset", "nbytes"]
    table = _paragraph((DOCS / "transport.md").read_text(encoding="utf-8"), "| call | what it does |")
    rows = {r.split("`", 2)[1].split("(", 1)[0]: r for r in table.splitlines() if r.startswith("| `")}
    assert "`.slice(offset, nbytes)`" in rows["Mem"] and "`.slice(offset, nbytes)`" in rows["Offer"]
    assert "`.slice()`" not in table


def test_transport_md_says_remove_peer_of_an_unknown_name_is_no_error():
    """``remove_peer`` of a name that names no loaded peer returns None and changes nothing, so a mistyped name
    after a failed post left the peer's disconnected mark (and its health reason) standing with no error; the API
    table said only that it fails the peer's sessions.  Behaviour pinned (the control: the peer's own name ends the
    passive session) and the row checked."""
    from lifecycle import LoopbackTransport, State, TransferEngine

    e = TransferEngine()
    a, b = LoopbackTransport(e, "docs-rp-a"), LoopbackTransport(None, "docs-rp-b")
    try:
        a.register(buf := bytearray(64))
        peer = a.add_peer(b.metadata())
        e.advertise(1, "sender")
        a.expect(1, peer, buf)
        assert a.remove_peer("docs-rp-B") is None and a.remove_peer("docs-rp-B") is None
        assert e.state(1) == State.InFlight and a.stats().passive == 1
        a.remove_peer(peer)  # control
        assert e.state(1) == State.Poisoned
    finally:
        a.stop()
        b.stop()
    table = _paragraph((DOCS / "transport.md").read_text(encoding="utf-8"), "| call | what it does |")
    row = " ".join(next(r for r in table.splitlines() if r.startswith("| `metadata()")).split())
    assert "a name that names no loaded peer (mistyped, never added) is no error either" in row


def test_audit_all_holds_every_name_audit_md_presents():
    """Review (session 29): docs/audit.md presents ``audit_events``, ``EXCUSABLE_KINDS`` and ``check_options``
    (with ``format_text`` and ``MAX_DEPTH``) as lifecycle.audit's, but ``__all__`` left them out, so ``from
    lifecycle.audit import *`` and API listings missed them.  Every public name of the module that the doc writes in
    backticks (``audit.X`` or bare) is in ``__all__`` now, and every ``__all__`` name exists.  Control: the scan
    finds the names the doc presents (those ``__all__`` always had among them)."""
    import inspect

    text = (DOCS / "audit.md").read_text(encoding="utf-8")
    named = {n for code in re.findall(r"`([^`\n]+)`", text)
             for n in re.findall(r"(?<![\w.])(?:lifecycle\.audit\.|audit\.)?([A-Za-z]\w*)", code)}
    own = {n for n in named if hasattr(audit, n) and not inspect.ismodule(getattr(audit, n))
           and getattr(getattr(audit, n), "__module__", audit.__name__) == audit.__name__}
    assert {"audit_paths", "validate_event", "native_unavailable", "Auditor"} <= own  # control
    assert sorted(own - set(audit.__all__)) == []
    assert [n for n in audit.__all__ if not hasattr(audit, n)] == []


def test_engine_md_says_what_session_info_evidence_means():
    """Review (session 29): ``SessionInfo.evidence`` was in no doc, and its name reads as "the session ended on
    evidence" while it is False on a Quiesced session (whose ``completed`` rests on the transport's DONE) and
    becomes True only on a late DONE after Poisoned (engine.cpp: kEvidence, set by a late ``complete`` in Poisoned
    or in a Terminated session that was Poisoned; it recovers the quarantined slot).  docs/engine.md names every
    field of ``info()``'s SessionInfo now and says that.  The behaviour pinned, with controls: a late DONE of a
    session that was never Poisoned, and a second failure, set nothing."""
    from dataclasses import fields

    from lifecycle import SessionInfo, State, TransferEngine

    e = TransferEngine(num_slots=4, slot_size=4096)
    e.advertise(1, "sender", 10)
    e.expose(1)
    e.complete(1)
    assert e.info(1).state == State.Quiesced and not e.info(1).evidence
    e.terminate(1)
    e.complete(1)  # late, never Poisoned: not evidence of anything new (control)
    assert not e.info(1).evidence
    e.advertise(2, "sender", 10)
    e.expose(2)
    e.fail(2)
    e.fail(2)  # (control: a failure is no evidence)
    assert e.info(2).state == State.Poisoned and not e.info(2).evidence
    e.complete(2)  # the late DONE, while Poisoned
    assert e.info(2).state == State.Poisoned and e.info(2).evidence
    e.advertise(3, "sender", 10)
    e.expose(3)
    e.fail(3)
    e.terminate(3)
    assert e.pool.stats()["quarantined"] == 1 and not e.info(3).evidence
    e.complete(3)  # the late DONE, after the termination (its tombstone)
    assert e.info(3).evidence and e.pool.stats()["quarantined"] == 0
    e.poll()

    para = " ".join(_paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "`info(req)` returns").split())
    missing = [f.name for f in fields(SessionInfo) if f"`{f.name}`" not in para]
    assert missing == []
    assert "False on every session that was never Poisoned, Quiesced ones included" in para
    assert "a late `complete`" in para and "`buffer_recovered`" in para


def test_a_reason_given_with_a_healthy_backend_is_kept_and_documented():
    """Review (session 29): ``set_backend_health(True, "x")`` looked as if it dropped the reason: no doc said what
    becomes of it (engine.md showed only ``set_backend_health(True, "")``).  It is kept, as a note: the engine
    stores it in ``Health.backend_reason`` whatever ``healthy`` is, and lists it in ``reasons`` (and so in the
    ``lifecycle.health`` log line) only while the backend is marked unhealthy.  The Health bullet and Health's
    docstring say so now.  Control: the same reason with False is listed."""
    from lifecycle import Health, TransferEngine

    e = TransferEngine()
    e.set_backend_health(True, "reconnected to peer b")
    h = e.health()
    assert h.healthy and h.backend_healthy and h.reasons == () and h.backend_reason == "reconnected to peer b"
    e.set_backend_health(False, "peer b lost")  # control
    h = e.health()
    assert not h.healthy and h.reasons == ("backend: peer b lost",) and h.backend_reason == "peer b lost"
    bullet = _paragraph((DOCS / "engine.md").read_text(encoding="utf-8"), "* **Health**")
    bullet = " ".join(bullet[:bullet.find("\n* ")].split())
    assert "a reason given with `True` is kept as `Health.backend_reason`" in bullet
    assert "``backend_reason``" in Health.__doc__
