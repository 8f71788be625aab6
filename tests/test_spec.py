"""The table validator, the generated copies, and the public surface."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lifecycle
from lifecycle import TABLE, CancelResult, Event, Outcome, SpecError, State, TerminateResult, _core, spec

ROOT = Path(__file__).resolve().parent.parent
TABLE_FILE = ROOT / "schemas" / "lifecycle.table"
GOOD = TABLE_FILE.read_text()


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(needle))


def decl(text: str, state: str) -> int:
    """Line where ``state`` is declared in [states]."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.split()[:1] == [state] and "terminal" in line
                or line.split()[:2] in ([state, "initial"], [state, "active"], [state, "final"]))


def codes(text: str) -> list[tuple[str, int]]:
    with pytest.raises(SpecError) as ei:
        spec.parse(text, "t.table")
    return [(v.code, v.line) for v in ei.value.violations]


def test_the_repository_table_is_valid():
    assert spec.check_file(TABLE_FILE) == []


def test_unreachable_state_is_reported_at_its_declaration():
    t = edit("Advertised       + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise",
             "Advertised       + cancel         = .stay                         -> CancelledBeforeAdvertise")
    t = edit("InFlight         + complete       = Quiesced         / completed", "InFlight         + complete       = .late", t)
    t = edit("CancelRequested  + complete       = Quiesced         / cancelled", "CancelRequested  + complete       = .late", t)
    assert ("unreachable", decl(t, "Quiesced")) in codes(t)


def test_dead_end_and_cannot_terminate_are_reported():
    t = edit("Poisoned         + terminate      = Terminated                    -> Terminated",
             "Poisoned         + terminate      = .stay                         -> AlreadyTerminated")
    found = codes(t)
    assert ("dead-end", decl(t, "Poisoned")) in found
    assert ("cannot-terminate", decl(t, "Poisoned")) in found


def test_edge_out_of_the_final_state_is_reported_with_its_row():
    t = edit("Terminated       + fail           = .late", "Terminated       + fail           = Poisoned")
    assert ("edge-out-of-final", line_of(t, "Terminated       + fail")) in codes(t)


def test_event_never_enabled_is_reported_at_its_declaration():
    """It was reported at line 1 (a comment), whatever line declared the event."""
    t = edit("grace_expired     timer", "grace_expired     timer\nrevive            executor")
    assert ("event-never-enabled", line_of(t, "revive ")) in codes(t)
    t = edit("*                + advertise      = Advertised\n", "")  # and no creating row: at [transitions]
    assert ("create-row", line_of(t, "[transitions]")) in codes(t)


def test_two_rows_for_one_pair_name_both_lines():
    t = edit("Advertised       + expose         = InFlight",
             "Advertised       + expose         = InFlight\nAdvertised       + expose         = Quiesced")
    with pytest.raises(SpecError) as ei:
        spec.parse(t, "t.table")
    (v,) = [v for v in ei.value.violations if v.code == "duplicate-row"]
    first = line_of(t, "Advertised       + expose")
    assert v.line == first + 1 and f"lines {first} and {first + 1}" in v.message


def test_every_violation_is_reported_at_once():
    t = edit("Terminated       + fail           = .late", "Terminated       + fail           = Poisoned")
    t = edit("grace_expired     timer", "grace_expired     timer\nrevive            executor", t)
    t = edit("Advertised       + expose         = InFlight", "Advertised       + expose         = InFlight\nAdvertised + expose = Poisoned", t)
    t = edit("+ complete       = Quiesced         / completed", "+ complete       = Quiesced         / finished", t)
    got = {c for c, _ in codes(t)}
    assert got >= {"duplicate-row", "edge-out-of-final", "event-never-enabled", "unknown-outcome"}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "missing-section"),
        ("garbage outside\n" + GOOD, "outside-section"),
        (GOOD.replace("Advertised       + expose         = InFlight", "Advertised + expose InFlight"), "syntax"),
        (GOOD.replace("= InFlight\n", "= Nowhere\n", 1), "unknown-state"),
        (GOOD.replace("Quiesced          terminal", "Quiesced          sometimes"), "bad-kind"),
        (GOOD + "\n[states]\n", "duplicate-section"),
        (GOOD.replace("+ expose         = InFlight", "+ exposé         = InFlight"), "unknown-event"),
        (GOOD.replace("/ completed", "/ finished"), "unknown-outcome"),
        (GOOD.replace("+ advertise      = Advertised", "+ advertise      = Advertised / completed"), "create-row"),
    ],
)
def test_malformed_tables_get_a_typed_error_with_a_line(text, code):
    with pytest.raises(SpecError) as ei:
        spec.parse(text, "bad.table")
    assert code in {v.code for v in ei.value.violations}
    assert all(str(v).startswith("bad.table:") for v in ei.value.violations)


def test_unreadable_file_is_a_typed_error(tmp_path):
    assert [v.code for v in spec.check_file(tmp_path / "missing.table")] == ["unreadable"]
    (tmp_path / "bin.table").write_bytes(b"\xff\xfe\x00garbage")
    assert [v.code for v in spec.check_file(tmp_path / "bin.table")] == ["unreadable"]


def test_spec_check_cli_lists_every_violation_with_json(tmp_path):
    bad = tmp_path / "bad.table"
    bad.write_text(edit("Terminated       + fail           = .late", "Terminated       + fail           = Poisoned"))
    r = subprocess.run([sys.executable, "-m", "lifecycle", "spec", "check", str(bad), "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False
    assert any(v["code"] == "edge-out-of-final" and v["line"] == line_of(bad.read_text(), "Terminated       + fail")
               for v in out["violations"])
    ok = subprocess.run([sys.executable, "-m", "lifecycle", "spec", "check", str(TABLE_FILE)], capture_output=True,
                        text=True, cwd=ROOT)
    assert ok.returncode == 0 and TABLE.digest in ok.stdout


def test_the_build_step_fails_on_an_invalid_table(tmp_path):
    bad = tmp_path / "bad.table"
    bad.write_text(edit("Terminated       + fail           = .late", "Terminated       + fail           = Poisoned"))
    gen = ROOT / "cpp" / "tools" / "gen_table.py"
    r = subprocess.run([sys.executable, str(gen), str(bad), str(tmp_path / "out.hpp")], capture_output=True, text=True)
    assert r.returncode == 1 and "edge-out-of-final" in r.stderr
    assert not (tmp_path / "out.hpp").exists()
    ok = subprocess.run([sys.executable, str(gen), str(TABLE_FILE), str(tmp_path / "ok.hpp")], capture_output=True, text=True)
    assert ok.returncode == 0 and TABLE.digest in (tmp_path / "ok.hpp").read_text()


@pytest.mark.parametrize("what", ["raw-string-end", "rows-past-line-65535"])
def test_a_valid_table_generates_a_header_that_compiles(tmp_path, what):
    """`spec check` said ok, then the build step died on an assert (a traceback; with -O a header whose raw
    string ended early), or the header failed to compile (a row line narrowed into 16 bits)."""
    prefix = '# a comment that holds the raw string\'s end: )LCTABLE"\n' if what == "raw-string-end" else "\n" * 70000
    table = tmp_path / "t.table"
    table.write_text(prefix + GOOD)
    assert spec.check_file(table) == []
    gen = ROOT / "cpp" / "tools" / "gen_table.py"
    hdr = tmp_path / "lifecycle" / "table_gen.hpp"
    r = subprocess.run([sys.executable, str(gen), str(table), str(hdr)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", (what, r.stderr)
    src = tmp_path / "use.cpp"
    src.write_text('#include "lifecycle/table_gen.hpp"\n#include <string_view>\n'
                   f"static_assert(sizeof(lifecycle::kTableText) - 1 == {len((prefix + GOOD).encode())});\n"  # the whole text
                   f"static_assert(lifecycle::kTable[0][1].line == {GOOD.split(chr(10)).index('Advertised       + expose         = InFlight') + 1 + prefix.count(chr(10))});\n")
    cxx = shutil.which("c++") or shutil.which("g++")  # (the build needs one: make setup installs g++)
    assert cxx is not None, "no C++ compiler on PATH"
    c = subprocess.run([cxx, "-std=c++20", "-Wall", "-Wextra", "-Wconversion", "-Werror", "-fsyntax-only",
                        f"-I{tmp_path}", str(src)], capture_output=True, text=True)
    assert c.returncode == 0, (what, c.stderr[-2000:])


def test_the_header_is_utf8_whatever_the_locale(tmp_path):
    """A valid table with a non-ASCII comment broke the build under an ASCII locale (LC_ALL=C without Python's
    UTF-8 mode: UnicodeEncodeError writing the header).  The header is written as UTF-8, so kTableText holds the
    table's own bytes.  Control: the same table under the default locale gives the same header."""
    text = "# caf\u00e9 \u2014 a comment\n" + GOOD
    table = tmp_path / "t.table"
    table.write_bytes(text.encode("utf-8"))
    assert spec.check_file(table) == []
    gen = ROOT / "cpp" / "tools" / "gen_table.py"
    ascii_env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    headers = []
    for env in (ascii_env, None):
        hdr = tmp_path / ("c" if env else "default") / "table_gen.hpp"
        r = subprocess.run([sys.executable, str(gen), str(table), str(hdr)], capture_output=True, text=True, env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr[-1000:]
        headers.append(hdr.read_bytes())
    assert headers[0] == headers[1] and text.encode("utf-8") in headers[0]


# ---- generated copies agree with the one table --------------------------------------------------------


def test_compiled_table_is_the_repository_table():
    assert _core.TABLE_TEXT == GOOD
    assert _core.TABLE_DIGEST == spec.load(TABLE_FILE).digest == TABLE.digest


def test_cpp_enums_and_python_enums_follow_the_table_order():
    assert list(_core.STATE_NAMES) == [s.value for s in State] == list(TABLE.states)
    assert list(_core.EVENT_NAMES) == [e.value for e in Event] == list(TABLE.events)
    assert list(_core.OUTCOME_NAMES) == ["none"] + [o.value for o in Outcome]
    assert list(_core.CANCEL_RESULT_NAMES) == [r.value for r in CancelResult]
    assert list(_core.TERMINATE_RESULT_NAMES) == [r.value for r in TerminateResult]


def test_every_compiled_cell_matches_its_row():
    action = {".stay": "stay", ".late": "late", ".defer": "defer"}
    for st, ev, act, dst, outcome, result, line in _core.table_cells():
        row = TABLE.row(st, ev)
        if row is None:
            assert (act, dst, line) == ("illegal", st, 0)
            continue
        assert act == action.get(row.dst, "move")
        assert dst == (row.dst if act == "move" else st)
        assert outcome == (row.outcome or "none")
        assert line == row.line
        names = TABLE.cancel_results if ev == "cancel" else TABLE.terminate_results
        assert (None if result is None else names[result]) == row.result


def test_reference_model_accepts_exactly_the_tables_pairs():
    from transitions import MachineError

    from lifecycle.model import build_machine

    class M:
        pass

    for st in TABLE.states:
        for ev in TABLE.events:
            if ev == TABLE.create_event:
                continue
            m = M()
            build_machine(TABLE, m, initial=st)
            row = TABLE.row(st, ev)
            if row is None:
                with pytest.raises(MachineError):
                    getattr(m, ev)()
            else:
                getattr(m, ev)()
                assert m.state == (row.dst if row.moves else st)


def test_public_surface_is_all():
    public = {n for n in dir(lifecycle) if not n.startswith("_") and n[0].isupper() or n in ("cancel_frees_now", "pool_slot")}
    modules = {"errors", "engine", "spec", "model", "cli", "collectives", "audit", "diagram", "report", "transport"}
    assert set(lifecycle.__all__) == public - modules
    for name in lifecycle.__all__:
        assert hasattr(lifecycle, name)


@pytest.mark.parametrize("sep", ["\x0c", "\x0b", "\x1c", "\x85", "\u2028", "\u2029"])
def test_only_newlines_end_a_line_so_comments_stay_comments_and_lines_stay_true(tmp_path, sep):
    """str.splitlines() also split at form feed, vertical tab, NEL, U+2028 ...: text after one inside a comment
    became a live row, and every later violation (and the row line compiled into C++) named the wrong line."""
    t = edit("# name            kind       meaning", f"# name{sep}Advertised + cancel = Poisoned -> NotCancellable")
    t = edit("Advertised       + expose         = InFlight",
             "Advertised       + expose         = InFlight\nAdvertised       + expose         = Quiesced", t)
    f = tmp_path / "t.table"
    f.write_bytes(t.encode())
    line = t.split("\n").index("Advertised       + expose         = Quiesced") + 1
    assert [(v.code, v.line) for v in spec.check_file(f)] == [("duplicate-row", line)]
    ok = edit("# name            kind       meaning", f"# name{sep}Advertised + cancel = Poisoned -> NotCancellable")
    f.write_bytes(ok.encode())
    s = spec.load(f)  # the comment stays a comment, and rows keep the line an editor shows
    assert s.row("Advertised", "cancel").dst == "Quiesced"
    assert s.row("Advertised", "expose").line == ok.split("\n").index("Advertised       + expose         = InFlight") + 1


@pytest.mark.parametrize(("old", "new", "name"), [
    ("expired           no evidence", "expired           no evidence\nnone              nothing", "none"),
    ("grace_expired     timer", "grace_expired     timer\ndelete            executor", "delete"),
    ("Terminated        final", "Terminated        final\nclass             active", "class"),
    ("expired           no evidence", "expired           no evidence\nmro               x", "mro"),
    ("NotFound                     no session", "_Lost_ no x\nNotFound                     no session", "_Lost_"),
])
def test_a_name_the_generated_code_cannot_carry_is_a_bad_name_at_its_line(tmp_path, old, new, name):
    """`spec check` said ok, then the build failed inside the generated header (an outcome `none` is a second
    Outcome::none; `delete`, `class` are C++ keywords) or `import lifecycle` failed building its enums (`mro`,
    `_sunder_`), naming neither the table nor the line."""
    t = edit(old, new)
    line = next(i for i, ln in enumerate(t.split("\n"), 1) if ln.startswith(name + " "))
    found = [(v.code, v.line) for v in _violations(t)]
    assert ("bad-name", line) in found and all(c == "bad-name" or c in _ALLOWED_EXTRA for c, _ in found), found
    bad = next(v for v in _violations(t) if v.code == "bad-name")
    assert f" {name} " in bad.message or f" {name!r} " in bad.message
    renamed = edit(old, new.replace(name, name.strip("_").capitalize() + "X", 1))  # the control: any other name
    assert "bad-name" not in {v.code for v in _violations(renamed)}


def _violations(text: str) -> list[spec.Violation]:
    try:
        spec.parse(text, "t.table")
    except SpecError as exc:
        return exc.violations
    return []


_ALLOWED_EXTRA = {"unreachable", "dead-end", "cannot-terminate", "event-never-enabled"}  # the new name is unused



@pytest.mark.parametrize(("old", "new", "code"), [
    ("InFlight         + complete       = Quiesced         / completed", "InFlight         + complete       = .defer",
     "defer-not-terminate"),
    ("Quiesced         + complete       = .late", "Quiesced         + complete       = .late  / failed", "outcome-without-move"),
    ("Quiesced         + cancel         = .stay", "Quiesced         + cancel         = .stay  / cancelled", "outcome-without-move"),
    ("*                + advertise      = Advertised", "*                + advertise      = Advertised  -> NotFound",
     "create-row"),
])
def test_a_row_whose_part_the_engine_would_ignore_or_misread_is_reported_at_its_line(old, new, code):
    """Accepted silently: `.defer` on an event other than terminate (the engine flagged the session for a deferred
    terminate when a transfer completed), an outcome on a row that does not move (the engine sets outcomes only
    on moves: the table said something nothing did), a result on the creating row (no call returns one)."""
    t = edit(old, new)
    line = next(i for i, ln in enumerate(t.split("\n"), 1) if ln.startswith(new.split("=")[0]))
    assert (code, line) in [(v.code, v.line) for v in _violations(t)], _violations(t)
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


def test_terminate_in_a_terminal_state_must_move_to_a_final_state():
    """Accepted: Poisoned + terminate = .stay (with Poisoned + complete = Terminated keeping it off dead-end).  The
    engine delivers a deferred terminate by applying the terminal state's terminate row as a move into a final
    state: here it 'moved' Poisoned to Poisoned, entered the final-state bookkeeping and sent TerminateNow."""
    t = edit("Poisoned         + terminate      = Terminated                    -> Terminated",
             "Poisoned         + terminate      = .stay                         -> AlreadyTerminated")
    t = edit("Poisoned         + complete       = .late", "Poisoned         + complete       = Terminated", t)
    found = [(v.code, v.line) for v in _violations(t)]
    assert ("terminate-at-terminal", line_of(t, "Poisoned         + terminate")) in found, found
    assert {c for c, _ in found} == {"terminate-at-terminal", "not-late"}, found  # (the extra move is no row either)
    t = edit("Poisoned         + complete       = .late", "Poisoned         + complete       = Terminated")
    # the control: the same extra move with terminate still moving to Terminated
    assert [c for c, _ in codes(t)] == ["not-late"]


def test_a_table_name_with_a_nul_byte_is_unreadable_not_a_value_error(tmp_path):
    """spec.load / check_file of a name holding a NUL byte raised os.stat's bare ValueError."""
    bad = str(tmp_path / "t.table") + "\0x"
    assert [(v.code, v.line, v.message) for v in spec.check_file(bad)] == [
        ("unreadable", 0, "cannot read table: embedded null byte")]
    with pytest.raises(SpecError):
        spec.load(bad)
    assert spec.check_file(TABLE_FILE) == []  # the control


def test_an_event_named_state_is_a_bad_name():
    """`spec check` accepted an event named `state`, then `lifecycle diagram` (and the reference model) died
    with transitions' ValueError "Trigger name cannot be same as model attribute name"."""
    t = edit("grace_expired     timer", "grace_expired     timer\nstate             timer")
    t = edit("CancelRequested  + timeout        = .stay", "CancelRequested  + timeout        = .stay\n"
             "CancelRequested  + state          = Poisoned         / expired", t)
    t += "".join(f"{st} + state = .late\n" for st in ("Quiesced", "Poisoned", "Terminated"))  # a timer is late there
    found = [(v.code, v.line) for v in _violations(t)]
    assert ("bad-name", line_of(t, "state             timer")) in found, found
    from lifecycle import diagram

    ok = spec.parse(t.replace("state ", "stale ").replace("+ state ", "+ stale "), "ok.table")  # the control
    assert "CancelRequested --> Poisoned : stale / expired" in diagram.render("mermaid", ok)


@pytest.mark.parametrize(("old", "new", "section", "name"), [
    ("grace_expired", "grace_over", "events", "grace_expired"),
    ("AlreadyDeferred              terminate was already deferred\n", "", "terminate-results", "AlreadyDeferred"),
    ("CancelRequested", "Cancelling", "states", "CancelRequested"),
])
def test_a_name_the_engine_uses_is_required_at_its_section(old, new, section, name):
    """A table without a name the C++ engine uses (an event renamed, AlreadyDeferred dropped: it is in no row)
    passed `spec check` and the generator, then the build failed in engine.cpp ("'grace_expired' is not a member
    of 'lifecycle::Event'"), naming neither the table nor a line."""
    t = GOOD.replace(old, new)
    assert t != GOOD
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert ("engine-name", line_of(t, f"[{section}]"), f"[{section}] {name} is required: the engine uses it") in found
    assert "engine-name" not in {v.code for v in _violations(GOOD)}  # the control


def test_the_names_the_engine_requires_are_the_names_its_sources_use():
    """spec's list of required names is checked against the C++ sources, so it cannot go stale."""
    import re

    used: dict[str, set[str]] = {}
    sections = {"State": "states", "Event": "events", "CancelResult": "cancel-results",
                "TerminateResult": "terminate-results"}
    for src in (ROOT / "cpp").rglob("*.[ch]pp"):
        for enum_name, member in re.findall(r"\b(State|Event|CancelResult|TerminateResult)::(\w+)", src.read_text()):
            if member in GOOD.split():  # the slot pool's own State enum (Free, Leased ...) is not the table's
                used.setdefault(sections[enum_name], set()).add(member)
    assert used and {k: set(v) for k, v in spec.ENGINE_NAMES.items()} == used


def test_a_byte_that_is_not_utf8_is_reported_at_its_line(tmp_path):
    """A table with one Latin-1 byte in a comment was 'unreadable' at line 0 ('can't decode byte 0xe9 in position
    2301'): the line that holds it was left to the reader to count."""
    t = edit("# name            kind       meaning", "# name            kind       meaning (caf\xe9)")
    f = tmp_path / "latin1.table"
    f.write_bytes(t.encode("latin-1"))
    (v,) = spec.check_file(f)
    assert (v.code, v.line) == ("unreadable", line_of(t, "# name            kind")), v
    col = next(ln for ln in t.split("\n") if ln.startswith("# name            kind")).index("\xe9") + 1
    assert v.message == f"cannot read table: not UTF-8: byte 0xe9 at column {col}", v.message
    f.write_bytes(t.encode("utf-8"))  # the control: the same text in UTF-8 is valid
    assert spec.check_file(f) == []


def test_a_nul_byte_is_reported_at_its_line(tmp_path):
    """A NUL byte in a comment passed `spec check` and the build, but lifecycle._core.TABLE_TEXT (a C string) ended
    at it: an installed package parsed a truncated table, a checkout's compiled copy differed from the file."""
    t = edit("# Theory of operation", "# Theory of\0 operation")
    f = tmp_path / "nul.table"
    f.write_text(t)
    assert [(v.code, v.line) for v in spec.check_file(f)] == [("nul-byte", line_of(t, "# Theory of"))]
    f.write_text(edit("# Theory of operation", "# Theory of\x7f operation"))  # the control: DEL is only text
    assert spec.check_file(f) == []


@pytest.mark.parametrize(("old", "new", "code"), [
    # frees-now: yes on a result whose row leaves the session exposed: the executor freed buffers in flight
    ("CancelRequestedInFlight      no ", "CancelRequestedInFlight      yes", "frees-not-terminal"),
    # a terminal state left for a non-final one: its evidence (Quiesced) or quarantine (Poisoned) undone
    ("Quiesced         + complete       = .late", "Quiesced         + complete       = InFlight",
     "edge-out-of-terminal"),
    ("Quiesced         + fail           = .late", "Quiesced         + fail           = Poisoned         / failed",
     "edge-out-of-terminal"),
])
def test_a_table_that_would_free_or_reuse_buffers_without_evidence_is_reported_at_its_line(old, new, code):
    """Accepted silently: CancelRequestedInFlight marked frees-now (the engine and the audit take the flag from the
    table, so an executor following cancel_frees_now() freed buffers a transfer may still write), and a terminal
    state with a move to a state other than the final one (Quiesced + complete = InFlight: a session the executor
    was told is quiesced, AlreadyComplete freeing it, exposed again)."""
    t = edit(old, new)
    line = next(i for i, ln in enumerate(t.split("\n"), 1) if ln.startswith(new.split("=")[0].rstrip()))
    found = [(v.code, v.line) for v in _violations(t)]
    assert (code, line) in found, found


def test_a_transport_or_timer_event_without_a_row_in_a_terminal_or_final_state_is_reported():
    """Accepted silently: a table without `Poisoned + complete = .late` (or any terminal / final state's transport or
    timer row).  DESIGN §2: such an event there is late, never an error; without the row the engine answered a
    backend's DONE after a disconnect with IllegalTransition."""
    for row in ("Poisoned         + complete       = .late", "Terminated       + timeout        = .late"):
        t = edit(row + "\n", "")
        state, event = row.split()[0], row.split()[2]
        found = [(v.code, v.line, v.message) for v in _violations(t)]
        assert [(c, ln) for c, ln, _ in found] == [("missing-late", decl(t, state))], found
        assert event in found[0][2], found
    t = edit("Poisoned         + complete       = .late", "Poisoned         + complete       = Terminated")
    # the control: a row that moves is a row (not missing), but it is no late row (see the test below)
    assert [(c, ln) for c, ln in codes(t)] == [("not-late", line_of(t, "Poisoned         + complete"))]


def test_the_collectives_consensus_names_are_the_tables():
    """lifecycle.collectives spells out the states that end a session (terminal and final) and the outcomes that mean
    failure, for poll_symmetric's consensus: a second copy of the table's facts that no test held to it (a terminal
    state added to the table never counted as quiesced there, and pending for ever)."""
    from lifecycle import collectives

    assert collectives._TERMINAL_STATES == set(TABLE.terminal) | set(TABLE.final)
    assert collectives._FAILED_OUTCOMES <= set(TABLE.outcomes)
    assert {"completed"} <= set(TABLE.outcomes)  # the one it compares with by name


@pytest.mark.parametrize(("old", "new"), [
    ("Poisoned         + cancel         = .stay                         -> NotCancellable",
     "Poisoned         + cancel         = .stay                         -> AlreadyComplete"),
    ("InFlight         + cancel         = CancelRequested               -> CancelRequestedInFlight",
     "InFlight         + cancel         = Poisoned         / failed     -> NotFound"),
    ("Terminated       + cancel         = .stay                         -> NotCancellable",
     "Terminated       + cancel         = .stay                         -> AlreadyComplete"),
])
def test_a_cancel_result_that_frees_now_outside_quiesced_is_reported_at_its_row(old, new):
    """Accepted silently: a frees-now cancel result returned by a row that leaves the session in Poisoned (or in
    Terminated): the state kinds cannot tell Quiesced from Poisoned (both terminal), so the executor following
    cancel_frees_now() freed a quarantined slot a transfer may still write (from Terminated: freed it twice)."""
    t = edit(old, new)
    state, result = new.split()[0], new.split()[-1]
    found = [v for v in _violations(t) if v.code == "frees-not-quiesced"]
    assert [(v.path, v.line) for v in found] == [("t.table", line_of(t, new.split("=")[0]))], _violations(t)
    assert found[0].message.startswith(f"{state} + cancel returns {result}, which frees now"), found[0].message
    assert _violations(GOOD) == []  # the control: AlreadyComplete (frees now) from Quiesced, where it is evidence


@pytest.mark.parametrize(("old", "new"), [
    ("InFlight         + fail           = Poisoned         / failed", "InFlight         + fail           = Poisoned"),
    ("CancelRequested  + complete       = Quiesced         / cancelled", "CancelRequested  + complete       = Quiesced"),
    ("Advertised       + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise",
     "Advertised       + cancel         = Quiesced                      -> CancelledBeforeAdvertise"),
])
def test_a_move_into_a_terminal_state_without_an_outcome_is_reported_at_its_row(old, new):
    """Accepted silently: a row entering Quiesced or Poisoned with no '/ outcome'.  The engine sets an outcome only
    when the row gives one, so the session ended with none (or an earlier move's), and a Quiesced one never counted
    as completed in poll_symmetric's consensus."""
    t = edit(old, new)
    src, event, dst = new.split()[0], new.split()[2], new.split()[4]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("missing-outcome", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + {event} = {dst} enters terminal {dst} without an outcome"), found
    # the outcomes it suggests are those its state allows (DESIGN §2), not a contradiction of it
    assert found[0][2].endswith("(one of completed, cancelled)" if dst == "Quiesced" else "(one of failed, expired)")
    assert _violations(edit(old, old)) == []  # the control: the row with its outcome


@pytest.mark.parametrize(("old", "new"), [
    ("Quiesced         + cancel", "Quiesced         + expose         = .stay\nQuiesced         + cancel"),
    ("Poisoned         + cancel", "Poisoned         + expose         = Terminated\nPoisoned         + cancel"),
    ("Terminated       + cancel", "Terminated       + expose         = .stay\nTerminated       + cancel"),
    ("Advertised       + expose         = InFlight",
     "Advertised       + expose         = .stay\nAdvertised       + fail           = InFlight"),
    ("Advertised       + expose         = InFlight", "Advertised       + expose         = Quiesced         / completed"),
])
def test_an_expose_that_leaves_the_session_unexposed_is_reported_at_its_row(old, new):
    """Accepted silently: Quiesced + expose = .stay (or any expose row from a state that has quiesced: Poisoned +
    expose = Terminated moved a quarantined session to Terminated and let it be exposed).  DESIGN §2: expose from a
    terminal or final state has no row, an illegal transition.  A `.stay` answer let the executor's expose() return
    without an error, so it handed out descriptors of buffers AlreadyComplete had freed; an expose that leaves the
    session Advertised or moves it to Quiesced makes its cancel (or its evidence) claim buffers nobody touches."""
    t = edit(old, new)
    row = new.split("\n")[0]
    src, dst = row.split()[0], row.split()[4]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert ("expose-not-active", line_of(t, row.split("=")[0])) in [(c, ln) for c, ln, _ in found], found
    msg = next(m for c, _, m in found if c == "expose-not-active")
    assert msg.startswith(f"{src} + expose = {dst} leaves the session in "), msg
    assert ("illegal transition" in msg) == (src != "Advertised"), msg
    assert _violations(GOOD) == []  # the control: Advertised + expose = InFlight


@pytest.mark.parametrize(("old", "new", "code"), [
    # no row: the engine's terminate() answered NotFound ("no session") for a session still exposed
    ("InFlight         + terminate      = .defer                        -> Deferred\n", "", "terminate-not-deferred"),
    # answered Deferred without the flag: TerminateNow never came (the session leaked)
    ("InFlight         + terminate      = .defer                        -> Deferred",
     "InFlight         + terminate      = .stay                         -> Deferred", "terminate-not-deferred"),
    # the executor told Terminated released its resources while the transfer may still write them
    ("Advertised       + terminate      = .defer                        -> Deferred",
     "Advertised       + terminate      = .defer                        -> Terminated", "terminate-result"),
    # a second Terminated: released twice
    ("Terminated       + terminate      = .stay                         -> AlreadyTerminated",
     "Terminated       + terminate      = .stay                         -> Terminated", "terminate-result"),
    # the move that terminates, answered as if it had happened before: never released
    ("Quiesced         + terminate      = Terminated                    -> Terminated",
     "Quiesced         + terminate      = Terminated                    -> AlreadyTerminated", "terminate-result"),
])
def test_a_terminate_row_that_does_not_defer_or_answers_wrong_is_reported(old, new, code):
    """Accepted silently.  DESIGN §5: a terminate before a terminal state sets a flag and returns Deferred; TerminateNow
    comes exactly once.  The executor acts on terminate()'s answer (Terminated: release now; Deferred: wait), so that
    answer follows from the row: Deferred on .defer, Terminated on the move to the final state, AlreadyTerminated on
    the final state's .stay."""
    t = edit(old, new)
    state = old.split()[0]
    line = line_of(t, new.split("=")[0]) if new else decl(t, state)
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [(code, line)], found
    assert state in found[0][2] and "terminate" in found[0][2], found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize(("old", "new", "code"), [
    ("InFlight         + timeout        = CancelRequested",
     "InFlight         + timeout        = Quiesced         / cancelled", "quiesced-without-evidence"),
    ("CancelRequested  + grace_expired  = Poisoned         / expired",
     "CancelRequested  + grace_expired  = Quiesced         / cancelled", "quiesced-without-evidence"),
    ("InFlight         + cancel         = CancelRequested               -> CancelRequestedInFlight",
     "InFlight         + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise",
     "quiesced-without-evidence"),
    ("InFlight         + fail           = Poisoned         / failed", "InFlight         + fail           = Advertised",
     "exposed-to-initial"),
])
def test_a_move_that_claims_evidence_an_exposed_session_lacks_is_reported_at_its_row(old, new, code):
    """Accepted silently.  DESIGN §3: only a session never exposed, or the transport's / peer's word (complete), proves
    that no agent touches its buffers; elapsed time, an error or a cancel do not.  InFlight + timeout = Quiesced put
    the slot back in the pool while bytes still landed; InFlight + fail = Advertised put an exposed session back in the
    state whose cancel answers CancelledBeforeAdvertise (frees now)."""
    t = edit(old, new)
    src, event, dst = new.split()[0], new.split()[2], new.split()[4]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert (code, line_of(t, new.split("=")[0])) in [(c, ln) for c, ln, _ in found], found
    msg = next(m for c, _, m in found if c == code)
    assert msg.startswith(f"{src} + {event} = {dst}: {src} may be exposed"), msg
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it
    if code == "exposed-to-initial":  # and so Advertised's cancel is no proof any more: that row is reported too
        assert ("quiesced-without-evidence", line_of(t, "Advertised       + cancel")) in [(c, ln) for c, ln, _ in found]


def test_a_move_into_quiesced_from_a_state_never_exposed_is_evidence():
    """The control for the rule above: Advertised's cancel is the table's own (never exposed), and a state reached
    from Advertised without an expose may quiesce on any event, as Advertised may."""
    t = edit("Advertised       + cancel", "Advertised       + timeout        = Parked\n"
             "Parked           + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise\n"
             "Parked           + terminate      = .defer                        -> Deferred\n"
             "Advertised       + cancel")
    t = edit("[events]", "Parked            active     not exposed yet, set aside\n\n[events]", t)
    assert _violations(t) == []


@pytest.mark.parametrize(("old", "new", "code"), [
    ("InFlight         + fail           = Poisoned         / failed",
     "InFlight         + fail           = Poisoned         / completed", "outcome-state-mismatch"),
    ("InFlight         + complete       = Quiesced         / completed",
     "InFlight         + complete       = Quiesced         / failed", "outcome-state-mismatch"),
    ("Poisoned         + terminate      = Terminated                    -> Terminated",
     "Poisoned         + terminate      = Terminated       / completed  -> Terminated", "outcome-into-final"),
])
def test_an_outcome_that_contradicts_its_state_is_reported_at_its_row(old, new, code):
    """Accepted silently.  DESIGN §2: a Quiesced session's outcome is completed or cancelled, and Poisoned has no
    evidence to claim either.  poll_symmetric's consensus reads a Terminated session's outcome by name, so a Poisoned
    session with outcome completed (or set so by its terminate) counted as completed on every rank once terminated; a
    deferred terminate (a bare move in the engine) set no outcome where a direct one did."""
    t = edit(old, new)
    src, event = new.split()[0], new.split()[2]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [(code, line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + {event} = "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize("new", [
    "Advertised       + cancel         = Quiesced         / completed  -> CancelledBeforeAdvertise",
    "Parked           + cancel         = Quiesced         / completed  -> CancelledBeforeAdvertise",
])
def test_an_outcome_completed_on_an_event_other_than_complete_is_reported_at_its_row(new):
    """Accepted silently: Advertised + cancel = Quiesced / completed (DESIGN §2: Quiesced(cancelled)).  Quiesced allows
    completed, so outcome-state-mismatch passed it, and a never-exposed session (never exposed is its evidence: no
    bytes moved) ended saying its transfer finished and was confirmed: poll_symmetric put a request every rank
    cancelled before the expose in ``completed`` on every rank, which the executor reads as the KV data arrived.  Only
    the transport's complete confirms a transfer.  Controls: the row as the table has it (cancelled), a DONE after a
    cancel declared completed (CancelRequested + complete: complete is the confirmation), and the never-exposed state
    of the second case with cancelled."""
    parked = ("Advertised       + timeout        = Parked\n"
              "Parked           + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise\n"
              "Parked           + terminate      = .defer                        -> Deferred\n"
              "Advertised       + cancel")
    base = GOOD
    if new.startswith("Parked"):  # a never-exposed state of the table's own (test_diagram's review tables add such)
        base = edit("[events]", "Parked            active     not exposed yet, set aside\n\n[events]",
                    edit("Advertised       + cancel", parked))
        assert _violations(base) == []  # its control: cancelled
        old = "Parked           + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise"
    else:
        old = "Advertised       + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise"
    t = edit(old, new, base)
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("outcome-without-confirmation", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{new.split()[0]} + cancel = Quiesced / completed: "), found
    assert _violations(edit(old, old, base)) == []  # the control: the row as the table has it
    done = "CancelRequested  + complete       = Quiesced         / "
    assert _violations(edit(done + "cancelled", done + "completed")) == []  # complete confirms: a table may say so


@pytest.mark.parametrize("row", [
    "InFlight         + cancel         = CancelRequested               -> CancelRequestedInFlight",
    "Advertised       + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise",
    "Quiesced         + cancel         = .stay                         -> AlreadyComplete",
])
def test_a_state_before_the_final_one_without_a_cancel_row_is_reported_at_its_declaration(row):
    """Accepted silently: a table without InFlight's (or Advertised's, Quiesced's) cancel row.  The engine's cancel()
    then answered NotCancellable, "nothing to cancel": a transfer never aborted, or a session the executor was never
    told it may free (DESIGN §4: cancel is idempotent and answers in every state).  The final state needs none: there
    NotCancellable is the answer."""
    t = edit(row + "\n", "")
    state = row.split()[0]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert ("missing-cancel", decl(t, state)) in [(c, ln) for c, ln, _ in found], found
    assert [c for c, _, _ in found] == ["missing-cancel"], found
    assert f"state {state} has no cancel row" in found[0][2], found
    assert _violations(edit("Terminated       + cancel         = .stay                         -> NotCancellable\n",
                            "")) == []  # the control: the final state without one


@pytest.mark.parametrize(("old", "new"), [
    ("InFlight         + timeout        = CancelRequested\n", ""),
    ("InFlight         + timeout        = CancelRequested", "InFlight         + timeout        = .stay"),
    ("CancelRequested  + grace_expired  = Poisoned         / expired", "CancelRequested  + grace_expired  = .late"),
    ("CancelRequested  + grace_expired  = Poisoned         / expired",
     "CancelRequested  + grace_expired  = CancelRequested"),
])
def test_a_timer_row_that_does_not_leave_its_state_is_reported(old, new):
    """Accepted silently (when another row still uses the event).  engine.cpp's tick() fires timeout on each overdue
    InFlight session and grace_expired on each overdue CancelRequested one until none is overdue: with no row, or one
    that stays, it applied the event to the same session for ever under the shard's lock (an illegal_event record
    queued each time); a move back into the state re-armed the timer, so the transfer was never aborted."""
    t = edit(old, new)
    state, event = old.split()[0], old.split()[2]
    line = line_of(t, new.split("=")[0]) if new else decl(t, state)
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert ("timer-stays", line) in [(c, ln) for c, ln, _ in found], found
    assert {c for c, _, _ in found} <= {"timer-stays", "late-before-quiescence"}, found
    msg = next(m for c, _, m in found if c == "timer-stays")
    assert state in msg and f"fires {event} there" in msg, msg
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize("new", ["CancelRequested  + grace_expired  = InFlight",
                                 "CancelRequested  + grace_expired  = InFlight         / expired"])
def test_timer_rows_that_loop_without_a_terminal_state_are_reported_at_the_row_closing_the_loop(new):
    """Accepted silently: CancelRequested + grace_expired = InFlight (it leaves its state, so timer-stays passed it).
    tick() then moved a hung transfer's session back and forth for ever (timeout: CancelRequested, another abort;
    grace_expired: InFlight, its timer re-armed), never terminal, so its deferred terminate never came: the wedge
    DESIGN §6's timers exist to end (grace_expired: Poisoned).  Now timer-loop, once, at the row that closes the loop.
    Controls: the row as the table has it; a timer into an active state with no timer of the engine's that the
    executor leaves (test_diagram's review tables: a retry state) stays valid."""
    old = "CancelRequested  + grace_expired  = Poisoned         / expired"
    t = edit(old, new)
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    # (an outcome on the move into InFlight is reported on its own: outcome-before-terminal)
    assert [c for c, _, _ in found if c == "outcome-before-terminal"] == ["outcome-before-terminal"] * ("/" in new)
    found = [f for f in found if f[0] != "outcome-before-terminal"]
    assert [(c, ln) for c, ln, _ in found] == [("timer-loop", line_of(t, "CancelRequested  + grace_expired"))], found
    assert found[0][2].startswith("CancelRequested + grace_expired = InFlight: "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it
    retry = edit("InFlight         + timeout        = CancelRequested", "InFlight         + timeout        = Retry")
    retry = edit("[events]", "Retry             active     timed out: the executor re-exposes or cancels\n\n[events]",
                 retry)
    retry += ("Retry + expose = InFlight\nRetry + cancel = CancelRequested -> CancelRequestedInFlight\n"
              "Retry + terminate = .defer -> Deferred\n")
    assert _violations(retry) == []


@pytest.mark.parametrize(("old", "new"), [
    ("InFlight         + complete       = Quiesced         / completed", "InFlight         + complete       = .late"),
    ("CancelRequested  + fail           = Poisoned         / failed", "CancelRequested  + fail           = .late"),
])
def test_a_late_row_before_quiescence_is_reported_at_its_row(old, new):
    """Accepted silently (while another row still reaches the state it no longer leads to).  `.late` means a
    transport event after quiescence (the table's header, DESIGN §2); InFlight + complete = .late dropped the
    transfer's DONE, the evidence, and counted it late: the session waited for its timers and ended Poisoned."""
    t = edit(old, new)
    src, event = new.split()[0], new.split()[2]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("late-before-quiescence", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + {event} = .late: {src} is active"), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize("name", ["BackendUnhealthy", "CancelledDeferred"])
def test_a_cancel_result_only_the_engine_answers_marked_frees_now_is_reported_at_its_declaration(name):
    """Accepted silently: no row returns BackendUnhealthy or CancelledDeferred (the engine answers them in place of
    a row's result), so the row-based frees-now check never saw them.  BackendUnhealthy marked yes: an executor
    following cancel_frees_now() freed the buffers of a cancel still in flight; CancelledDeferred: freed them, then
    freed them again on the deferred terminate's TerminateNow."""
    t = edit(f"{name:<28} no ", f"{name:<28} yes")
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("frees-not-terminal", line_of(t, name + " "))], found
    assert found[0][2].startswith(f"cancel result {name} frees now, but the engine answers it "), found
    assert _violations(GOOD) == []  # the control: both marked no


@pytest.mark.parametrize(("event", "source", "lates"), [("fail", "executor", True), ("complete", "timer", False),
                                                         ("expose", "transport", False)])
def test_an_engine_event_declared_with_another_source_is_reported_at_its_declaration(event, source, lates):
    """Accepted silently: `fail  executor` with the terminal and final states' `fail = .late` rows removed (the late
    checks go by the declared source), so a disconnect after quiescence raised IllegalTransition (DESIGN §2: late,
    never an error).  The engine fixes who posts each of its events: the transport complete and fail, its timers
    timeout and grace_expired, the executor the rest."""
    decl_line = next(ln for ln in GOOD.split("\n") if ln.startswith(f"{event} ") and ln.split()[1] in
                     ("executor", "transport", "timer"))
    t = edit(decl_line, decl_line.replace(decl_line.split()[1], f"{source:<9}", 1))
    if lates:
        for st in ("Quiesced", "Poisoned", "Terminated"):
            t = edit(next(ln for ln in t.split("\n") if ln.split()[:3] == [st, "+", event]) + "\n", "", t)
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert ("engine-source", line_of(t, f"{event} ")) in [(c, ln) for c, ln, _ in found], found
    assert next(m for c, _, m in found if c == "engine-source").startswith(f"[events] {event} comes from the "), found
    assert _violations(GOOD) == []  # the control


@pytest.mark.parametrize(("old", "new"), [
    ("Poisoned         + complete       = .late", "Poisoned         + complete       = Terminated"),
    ("Poisoned         + complete       = .late", "Poisoned         + complete       = .stay"),
    ("Terminated       + timeout        = .late", "Terminated       + timeout        = .stay"),
])
def test_a_transport_or_timer_event_after_quiescence_that_is_not_late_is_reported_at_its_row(old, new):
    """Accepted silently (the late check wanted only some row).  DESIGN §2: such an event is late, unchanged and
    counted.  Poisoned + complete = Terminated terminated the session without the executor's terminate (which then
    answered AlreadyTerminated: nothing released) and its late DONE recovered nothing; `.stay` dropped the evidence a
    late complete gives a quarantined slot, and the count."""
    t = edit(old, new)
    src, event, dst = new.split()[0], new.split()[2], new.split()[4]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("not-late", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + {event} = {dst}: a "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize(("old", "new"), [
    ("-> CancelledBeforeAdvertise", "-> CancelledDeferred"),
    ("InFlight         + cancel         = CancelRequested               -> CancelRequestedInFlight",
     "InFlight         + cancel         = CancelRequested               -> BackendUnhealthy"),
    ("Quiesced         + cancel         = .stay                         -> AlreadyComplete",
     "Quiesced         + cancel         = .stay                         -> NotFound"),
])
def test_a_row_returning_a_result_only_the_engine_answers_is_reported_at_its_row(old, new):
    """Accepted silently.  NotFound (no session) and the refinements (BackendUnhealthy, CancelledDeferred) are the
    engine's answers, never a row's: Advertised + cancel -> CancelledDeferred told every such cancel 'frees now: no,
    its TerminateNow releases it' with no terminate deferred, so nothing ever freed the session."""
    t = edit(old, new)
    result = new.split()[-1]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    row = next(ln for ln in t.split("\n") if ln.endswith("-> " + result))
    assert [(c, ln) for c, ln, _ in found] == [("engine-only-result", line_of(t, row))], found
    assert f"returns {result}, which only the engine answers" in found[0][2], found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize(("old", "new"), [
    ("Poisoned         + cancel         = .stay                         -> NotCancellable",
     "Poisoned         + cancel         = Terminated                    -> NotCancellable"),
    ("Quiesced         + cancel         = .stay                         -> AlreadyComplete",
     "Quiesced         + cancel         = Terminated                    -> NotCancellable"),
])
def test_a_cancel_that_moves_a_terminal_session_to_the_final_state_is_reported_at_its_row(old, new):
    """Accepted silently (NotCancellable frees now: no, so frees-not-quiesced passed it).  DESIGN §2: only terminate
    enters Terminated, "the executor's resources were released".  The engine's cancel moved the session there (its
    slot quarantined, or from Quiesced back in the pool) while telling the executor to wait for a terminal state;
    its terminate then answered AlreadyTerminated and on_terminate never ran: the executor's KV blocks leaked."""
    t = edit(old, new)
    src = new.split()[0]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("cancel-into-final", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + cancel = Terminated: "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize("row", ["Advertised + advertise = .stay", "Quiesced + advertise = .stay",
                                 "Terminated + advertise = .stay", "Advertised + advertise = InFlight"])
def test_a_row_for_the_creating_event_from_a_state_is_reported_at_its_row(row):
    """Accepted silently.  DESIGN §2: advertise creates the session (the table's one `*` row).  The engine never
    applies it to a session (advertise of a live id answers Duplicate; post('advertise') is refused), while the
    reference model's apply and the audit's replay take the row: the table said a pair was legal that the engine
    refuses (Advertised + advertise = InFlight: an expose the engine never made)."""
    t = GOOD + row + "\n"
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("create-from-state", line_of(t, row.split("=")[0]))], found
    assert found[0][2].startswith(row.split(" = ")[0] + " = "), found
    assert _violations(GOOD) == []  # the control: the creating row from `*` only


@pytest.mark.parametrize(("old", "new"), [
    ("Advertised       + expose         = InFlight", "Advertised       + expose         = InFlight / cancelled"),
    ("InFlight         + timeout        = CancelRequested",
     "InFlight         + timeout        = CancelRequested / expired"),
    ("InFlight         + cancel         = CancelRequested               -> CancelRequestedInFlight",
     "InFlight         + cancel         = CancelRequested  / cancelled  -> CancelRequestedInFlight"),
    ("InFlight         + timeout        = CancelRequested",
     "InFlight         + timeout        = CancelRequested / completed"),
])
def test_an_outcome_on_a_move_into_a_state_before_a_terminal_one_is_reported_at_its_row(old, new):
    """Accepted silently (but for `completed`, reported as unconfirmed).  An outcome says how a session ended (DESIGN
    §2: Quiesced's completed / cancelled; docs/audit.md: null before a terminal state): InFlight + cancel =
    CancelRequested / cancelled had engine.outcome() and the audit's transition line claim a stop 'with evidence' for
    a session whose transfer may still write its buffers."""
    t = edit(old, new)
    src, event, dst = new.split()[0], new.split()[2], new.split()[4]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("outcome-before-terminal", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + {event} = {dst} / "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize(("old", "new"), [
    ("CancelRequested  + cancel         = .stay                         -> CancelRequestedInFlight",
     "CancelRequested  + cancel         = CancelRequested               -> CancelRequestedInFlight"),
    ("InFlight         + fail           = Poisoned         / failed", "InFlight         + fail           = InFlight"),
    ("InFlight         + complete       = Quiesced         / completed",
     "InFlight         + complete       = InFlight"),
    ("Advertised       + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise",
     "Advertised       + cancel         = Advertised                    -> NotCancellable"),
])
def test_a_move_into_its_own_state_before_a_terminal_one_is_reported_at_its_row(old, new):
    """Accepted silently (the timer rows alone were held to leave their state).  The engine's move re-enters the
    state: its entry time, which the timers count from, is reset and a transition recorded.  CancelRequested + cancel
    = CancelRequested re-armed cancel_grace (and queued another abort) on every cancel, so an executor repeating its
    cancel (idempotent, DESIGN §4) kept a transfer that never acks from ever reaching Poisoned: the cancellation-burst
    wedge of DESIGN §1; InFlight + fail = InFlight re-armed transfer_timeout on each error.  `.stay` changes
    nothing."""
    t = edit(old, new)
    src, event = new.split()[0], new.split()[2]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("self-move", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + {event} = {src}: "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize(("old", "new"), [
    ("CancelRequested  + fail           = Poisoned         / failed", "CancelRequested  + fail           = InFlight"),
    ("CancelRequested  + cancel         = .stay                         -> CancelRequestedInFlight",
     "CancelRequested  + cancel         = InFlight                      -> CancelRequestedInFlight"),
    ("CancelRequested  + complete       = Quiesced         / cancelled",
     "CancelRequested  + complete       = InFlight"),
    ("CancelRequested  + timeout        = .stay", "CancelRequested  + timeout        = InFlight"),
])
def test_a_row_back_into_the_timers_loop_is_reported_at_its_row(old, new):
    """Accepted silently (timer-loop follows the timer rows only).  CancelRequested + fail = InFlight: the abort a
    timeout issued is answered with an error (as an aborted transfer's is), the session is InFlight again with its
    transfer_timeout re-armed, times out, is aborted, fails...: never terminal, its deferred terminate never delivered
    (DESIGN §6).  CancelRequested + cancel = InFlight toggled on every repeated cancel (DESIGN §4: idempotent) the
    same way.  Controls: the row as the table has it; the same row in a review table whose InFlight timer leads to a
    retry state the executor leaves (the executor's to end, as for timer-loop)."""
    t = edit(old, new)
    row = new.split("\n")[-1]
    src, event = row.split()[0], row.split()[2]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    # (the complete row drops the evidence too, the cancel row claims an abort it does not issue: on their own)
    side = {"complete": "complete-not-evidence", "cancel": "cancel-result"}.get(event)
    assert [c for c, _, _ in found if c == side] == [side] * (side is not None), found
    found = [f for f in found if f[0] != side]
    assert [(c, ln) for c, ln, _ in found] == [("timer-reset", line_of(t, row.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + {event} = InFlight: "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it
    retry = edit("InFlight         + timeout        = CancelRequested", "InFlight         + timeout        = Retry", t)
    retry = edit("[events]", "Retry             active     timed out: the executor re-exposes or cancels\n\n[events]",
                 retry)
    retry += "Retry + cancel = CancelRequested -> CancelRequestedInFlight\nRetry + terminate = .defer -> Deferred\n"
    assert [v.code for v in _violations(retry)] == [side] * (side is not None)


@pytest.mark.parametrize(("old", "new"), [
    ("InFlight         + complete       = Quiesced         / completed",
     "InFlight         + complete       = Poisoned         / failed"),
    ("InFlight         + complete       = Quiesced         / completed", "InFlight         + complete       = .stay"),
    ("CancelRequested  + complete       = Quiesced         / cancelled",
     "CancelRequested  + complete       = Poisoned         / expired"),
    ("CancelRequested  + complete       = Quiesced         / cancelled", "CancelRequested  + complete       = .stay"),
    ("InFlight         + complete       = Quiesced         / completed\n", ""),
    ("CancelRequested  + complete       = Quiesced         / cancelled\n", ""),
])
def test_a_complete_that_does_not_quiesce_an_exposed_session_is_reported(old, new):
    """Accepted silently (late-before-quiescence caught only `= .late`).  DESIGN §3: complete (the transport's DONE,
    the peer's ack) is the evidence that access stopped.  InFlight + complete = .stay or = Poisoned, or no row (the
    DONE an IllegalTransition), dropped it: every transfer waited for its timers and ended Poisoned, its good slot
    quarantined until the pool was spent.  Reported at the row, or at the state's declaration when it has none.
    Controls: the row as the table has it; a review table's retry state without a complete row (test above)."""
    t = edit(old, new)
    state = old.split()[0]
    line = line_of(t, new.split("=")[0]) if new else decl(t, state)
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("complete-not-evidence", line)], found
    assert found[0][2].startswith(f"{state} + complete = {new.split()[4]}: " if new else f"{state} "), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it


@pytest.mark.parametrize(("old", "new"), [
    ("InFlight         + timeout", "InFlight         + expose         = .stay\nInFlight         + timeout"),
    ("CancelRequested  + timeout", "CancelRequested  + expose         = .stay\nCancelRequested  + timeout"),
    ("InFlight         + timeout", "InFlight         + expose         = CancelRequested\nInFlight         + timeout"),
])
def test_an_expose_while_a_transfer_may_run_is_reported_at_its_row(old, new):
    """Accepted silently (expose-not-active looked at the state after the row only).  DESIGN §2: expose leaves
    Advertised; in InFlight or CancelRequested a transfer is posted (or being aborted), and the engine awaits the
    evidence of that one.  InFlight + expose = .stay answered a second expose() without an error, so an executor with
    its own data path handed the descriptors out again: the first transfer's DONE quiesced, and the pool reused,
    buffers the second was still writing.  Controls: the table as it is (no row: an illegal transition), and a review
    table's retry state the executor re-exposes from (the timer-loop test's)."""
    t = edit(old, new)
    row = new.split("\n")[0]
    src, dst = row.split()[0], row.split()[4]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("expose-while-exposed", line_of(t, row.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + expose = {dst}: "), found
    assert _violations(edit(old, old)) == []  # the control: no expose row there


@pytest.mark.parametrize(("old", "new", "want"), [
    ("Poisoned         + cancel         = .stay                         -> NotCancellable",
     "Poisoned         + cancel         = .stay                         -> CancelRequestedInFlight", "NotCancellable"),
    ("InFlight         + cancel         = CancelRequested               -> CancelRequestedInFlight",
     "InFlight         + cancel         = .stay                         -> CancelRequestedInFlight", None),
    ("InFlight         + cancel         = CancelRequested               -> CancelRequestedInFlight",
     "InFlight         + cancel         = CancelRequested               -> NotCancellable", "CancelRequestedInFlight"),
    ("CancelRequested  + cancel         = .stay                         -> CancelRequestedInFlight",
     "CancelRequested  + cancel         = .stay                         -> NotCancellable", "CancelRequestedInFlight"),
    ("Quiesced         + cancel         = .stay                         -> AlreadyComplete",
     "Quiesced         + cancel         = .stay                         -> NotCancellable", "AlreadyComplete"),
    ("Advertised       + cancel         = Quiesced         / cancelled  -> CancelledBeforeAdvertise",
     "Advertised       + cancel         = Quiesced         / cancelled  -> CancelRequestedInFlight",
     "CancelledBeforeAdvertise"),
])
def test_a_cancel_result_its_row_contradicts_is_reported_at_its_row(old, new, want):
    """Accepted silently (only a frees-now result was held to its state).  DESIGN §4: the executor acts on the answer.
    Poisoned + cancel -> CancelRequestedInFlight told it an abort was issued and to wait for a terminal state the
    session had already reached; InFlight + cancel = .stay -> CancelRequestedInFlight, an abort none was (the engine
    issues one only on the move into CancelRequested); InFlight + cancel = CancelRequested -> NotCancellable, 'Poisoned
    or Terminated, nothing to cancel' for a transfer being aborted (and BackendUnhealthy, the engine's refinement of
    CancelRequestedInFlight, never came); Quiesced -> NotCancellable never told it that it may free.  Controls: the
    row as the table has it; NotCancellable from a review table's active state (test_diagram's) stays the table's."""
    t = edit(old, new)
    src, dst, result = new.split()[0], new.split()[4], new.split()[-1]
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("cancel-result", line_of(t, new.split("=")[0]))], found
    assert found[0][2].startswith(f"{src} + cancel = {dst} " + (f"must return {want}, not {result}" if want else
                                                                  f"returns {result}")), found
    assert _violations(edit(old, old)) == []  # the control: the row as the table has it
    review = edit("[events]", "Held              active     set aside by the executor\n\n[events]")
    review += ("Advertised + timeout = Held\nHeld + expose = InFlight\nHeld + cancel = .stay -> NotCancellable\n"
               "Held + terminate = .defer -> Deferred\n")
    assert _violations(review) == []


def test_a_final_state_without_a_terminate_row_is_reported_at_its_declaration():
    """Accepted silently (the terminate checks looked at the states before the final one).  DESIGN §4, §5: terminate
    of a Terminated session answers AlreadyTerminated, re-entrant calls from on_terminate included.  Without the row
    the engine's terminate() took it for an illegal transition and answered NotFound (its 'unreachable for a validated
    table'), which the executor reads as 'no session: free what you hold', and logged it as rejected."""
    row = "Terminated       + terminate      = .stay                         -> AlreadyTerminated\n"
    t = edit(row, "")
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("terminate-in-final", decl(t, "Terminated"))], found
    assert found[0][2].startswith("final state Terminated has no terminate row"), found
    assert found[0][2].endswith("add 'Terminated + terminate = .stay -> AlreadyTerminated'"), found
    assert _violations(edit(row, row)) == []  # the control: the row as the table has it


def test_a_cancel_not_found_that_does_not_free_now_is_reported_at_its_declaration():
    """Accepted silently (the frees-now checks held only a `yes` to its state).  DESIGN §4: NotFound allows the
    executor to free now.  The engine answers it when it has no session (never advertised, or its tombstone gone), so
    no terminal state or TerminateNow ever follows, and README's loop (terminate: NotFound too) released nothing: an
    executor following cancel_frees_now() leaked the request's resources.  Control: the column as the table has it."""
    old = "NotFound                     yes        no session with this request id"
    new = "NotFound                     no         no session with this request id"
    t = edit(old, new)
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("not-found-kept", line_of(t, new))], found
    assert found[0][2].startswith("cancel result NotFound must free now"), found
    assert _violations(edit(old, old)) == []


@pytest.mark.parametrize("row", ["Advertised + complete = Quiesced / completed",
                                 "Parked + complete = Quiesced / completed"])
def test_completed_from_a_state_never_exposed_is_reported_at_its_row(row):
    """Accepted silently (outcome-without-confirmation asks for the complete event only).  A complete in a session
    never exposed (a stray or stale notification: nothing was posted, no descriptor handed out) confirms no transfer,
    yet Quiesced / completed told poll_symmetric's consensus, and the executor, that the KV data had arrived.
    Controls: the table as it is (InFlight + complete = Quiesced / completed); the never-exposed state's complete
    quiescing as cancelled (never exposed is its evidence)."""
    base = GOOD
    if row.startswith("Parked"):  # a never-exposed state of a review table's own
        base = edit("[events]", "Parked            active     not exposed yet, set aside\n\n[events]",
                    GOOD + "Advertised + timeout = Parked\nParked + cancel = Quiesced / cancelled -> "
                           "CancelledBeforeAdvertise\nParked + terminate = .defer -> Deferred\n")
        assert _violations(base) == []
    t = base + row + "\n"
    found = [(v.code, v.line, v.message) for v in _violations(t)]
    assert [(c, ln) for c, ln, _ in found] == [("completed-never-exposed", line_of(t, row.split("=")[0]))], found
    assert found[0][2].startswith(row + ": "), found
    assert _violations(base + row.replace("completed", "cancelled") + "\n") == []
