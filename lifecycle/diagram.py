"""State diagrams (Mermaid, DOT, SVG) generated from the lifecycle table, via ``transitions``.

The graph is read from the ``transitions.Machine`` that :func:`lifecycle.model.build_machine` builds from
the table: its states, and every event's transitions with a destination.  Internal transitions
(``dest=None``: .stay/.late/.defer rows) are not moves; the deferrals among them are drawn as dashed
self-loops because exactly-once deferred termination is part of the design.  Labels take the outcome
from the table row.  Output is deterministic: states in table order, edges sorted, no timestamps,
and the Graphviz version comment is stripped from SVG.

    lifecycle diagram --format mermaid|dot|svg [--out FILE] [--counts-from LOG ...]
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import spec as _spec
from .model import build_machine

__all__ = ["Edge", "Graph", "graph", "main_diagram", "render", "to_dot", "to_mermaid", "to_svg"]

FORMATS = ("mermaid", "dot", "svg")
START = "[*]"


@dataclass(frozen=True)
class Edge:
    src: str  # a state, or START for the creating event
    trigger: str
    dst: str
    outcome: str | None
    deferred: bool = False  # a .defer self-loop (not a move)

    @property
    def key(self) -> tuple[str | None, str, str]:
        return (None if self.src == START else self.src, self.trigger, self.dst)


@dataclass(frozen=True)
class Graph:
    states: tuple[str, ...]
    kinds: dict[str, str]
    docs: dict[str, str]
    edges: tuple[Edge, ...]
    digest: str
    initial: str
    final: tuple[str, ...]


def graph(spec: _spec.Spec | None = None) -> Graph:
    """Walk ``build_machine(spec)``: the machine's states and its transitions that have a destination."""
    sp = spec if spec is not None else _spec.load_default()
    m = build_machine(sp)
    states = tuple(m.states)  # table order (the machine keeps insertion order)
    order = {s: i for i, s in enumerate(states)}
    ev_order = {e: i for i, e in enumerate(sp.events)}
    edges: list[Edge] = [Edge(START, sp.create_event, sp.initial, None)]
    moves: list[Edge] = []
    for name, ev in m.events.items():
        for src, trs in ev.transitions.items():
            for t in trs:
                row = sp.row(src, name)
                if t.dest is not None:
                    moves.append(Edge(src, name, t.dest, row.outcome if row else None))
                elif row is not None and row.dst == ".defer":
                    moves.append(Edge(src, name, src, None, deferred=True))
    moves.sort(key=lambda e: (order[e.src], e.deferred, ev_order[e.trigger], order[e.dst]))
    edges.extend(moves)
    return Graph(states, dict(sp.state_kinds), dict(sp.state_docs), tuple(edges), sp.digest, sp.initial,
                 tuple(sp.final))


def _label(e: Edge, counts: dict | None) -> str:
    lab = e.trigger
    if e.deferred:
        lab += " (deferred)"
    elif e.outcome:
        lab += f" / {e.outcome}"
    if counts is not None and not e.deferred:
        lab += f" ×{counts.get(e.key, 0)}"
    return lab


def _header(g: Graph) -> str:
    return (f"GENERATED from schemas/lifecycle.table (digest {g.digest}) by `lifecycle diagram`; do not edit. "
            "Double border: terminal (termination allowed); dark: final; dashed: deferred terminate.")


# Words Mermaid's stateDiagram lexer (case-insensitive) reads as keywords where a state id stands, and ids that
# Mermaid takes for itself: its state database's (root: the diagram; root_start / root_end: the [*] of an edge) and,
# its layout keeping nodes in plain JavaScript objects, the names of Object.prototype's members.  A state so named (an
# added `note` or `State` in a review table) stopped the parse ("Expecting 'ID', 'EDGE_STATE', got 'note'"),
# root_start / root_end were merged with [*], and toString & co. failed the layout ("Cannot set properties of
# undefined (setting 'order')") (checked against mermaid 11.16).  Such a state is drawn under the id '_' + name,
# declared with its name as the label: no state's own name starts with '_' (the spec reserves it).
_MERMAID_KEYWORDS = frozenset(w.lower() for w in (
    "accDescr", "accTitle", "class", "classDef", "click", "default", "href", "note", "scale", "state", "stateDiagram",
    "style"))
_MERMAID_IDS = frozenset(("root", "root_start", "root_end", "constructor", "hasOwnProperty", "isPrototypeOf",
                          "propertyIsEnumerable", "toLocaleString", "toString", "valueOf"))
# The lexer also takes `.*direction\s+LR[^\n]*` (TB, BT, RL too) for a direction statement wherever it matches, across
# a line end: an edge whose label ended in "direction" (an event `redirection`) followed by a line that began with
# a state named LRU ... read as `direction LR`, and that edge and the next line's were not drawn.  A state's id
# begins a line, so one whose name begins so is drawn under the alias too.
_MERMAID_DIRECTIONS = ("tb", "bt", "rl", "lr")


def _mermaid_id(state: str) -> str:
    lower = state.lower()
    taken = lower in _MERMAID_KEYWORDS or state in _MERMAID_IDS or lower.startswith(_MERMAID_DIRECTIONS)
    return "_" + state if taken else state


def to_mermaid(g: Graph, counts: dict | None = None) -> str:
    out = ["stateDiagram-v2", f"    %% {_header(g)}", "    direction LR"]
    ids = {s: _mermaid_id(s) for s in g.states}
    out += [f'    state "{s}" as {i}' for s, i in ids.items() if i != s]
    for e in g.edges:
        src = "[*]" if e.src == START else ids[e.src]
        out.append(f"    {src} --> {ids[e.dst]} : {_label(e, counts)}")
    for s in g.final:
        out.append(f"    {ids[s]} --> [*]")
    out.append("    classDef terminal fill:#fff3bf,stroke:#b08800,stroke-width:3px")
    out.append("    classDef final fill:#343a40,color:#ffffff,stroke:#000000,stroke-width:4px")
    terminal = [s for s in g.states if g.kinds[s] == "terminal"]
    if terminal:
        out.append(f"    class {','.join(ids[s] for s in terminal)} terminal")
    if g.final:
        out.append(f"    class {','.join(ids[s] for s in g.final)} final")
    return "\n".join(out) + "\n"


# Graphviz decodes entities in a string (&amp; is '&') and reads backslashes as escapes (\N: the node's name, \G: the
# graph's), a tooltip's twice (interpretCRNL, then the \N substitution).  A state's description is free text from
# the table: "a &amp; b" showed "a & b", "\N" the state's name, "\\" one backslash, and a control character (vertical
# tab, form feed, escape), which XML cannot hold, left an SVG that no XML reader opens.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _q(s: str) -> str:
    """``s`` as a quoted Graphviz string that shows as ``s`` in a label: '&' as &amp;, a backslash escaped, a control
    character as its Unicode control picture (U+2400 + code), U+FFFE / U+FFFF as U+FFFD."""
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
    return '"' + _XML_INVALID.sub(lambda m: chr(0x2400 + ord(m[0])) if m[0] < " " else "\ufffd", s) + '"'


def _q_tooltip(s: str) -> str:
    """``_q`` for a tooltip, whose backslashes Graphviz unescapes twice."""
    return _q(s.replace("\\", "\\\\"))


_START_NODE, _END_NODE = "__start__", "__end__"  # DOT's pseudo-nodes for [*]


def to_dot(g: Graph, counts: dict | None = None) -> str:
    title = "kv-lifecycle session lifecycle" + (" (observed counts)" if counts is not None else "")
    out = [
        f"// {_header(g)}",
        "digraph lifecycle {",
        f'  graph [rankdir=LR, fontname="Helvetica", fontsize=12, labelloc=t, label={_q(title)}, '
        'nodesep=0.45, ranksep=0.7, bgcolor="white"];',
        '  node [fontname="Helvetica", fontsize=12, shape=box, style="rounded,filled", fillcolor="#e7f0fa", '
        'color="#2b5d8a"];',
        '  edge [fontname="Helvetica", fontsize=10, color="#444444"];',
        # the pseudo-nodes' ids keep their underscores: no state can be named so (spec: a leading '_' is reserved),
        # where "state-start" / "state-end" were also the ids of states named start / end
        f'  "{_START_NODE}" [id="state-{_START_NODE}", shape=point, width=0.18, label="", fillcolor="black"];',
        f'  "{_END_NODE}" [id="state-{_END_NODE}", shape=doublecircle, width=0.12, label="", style=filled, '
        'fillcolor="black"];',
    ]
    for s in g.states:
        kind = g.kinds[s]
        attrs = [f'id="state-{s}"', f"tooltip={_q_tooltip(kind + ': ' + g.docs.get(s, ''))}"]
        if kind == "terminal":
            attrs += ['peripheries=2', 'fillcolor="#fff3bf"', 'color="#b08800"', 'penwidth=2']
        elif kind == "final":
            attrs += ['shape=doublecircle', 'fillcolor="#343a40"', 'fontcolor="white"', 'color="black"']
        elif kind == "initial":
            attrs += ['fillcolor="#d0ebff"']
        out.append(f"  {_q(s)} [{', '.join(attrs)}];")
    for e in g.edges:
        src = _START_NODE if e.src == START else e.src
        attrs = [f'id="edge-{src}-{e.trigger}-{e.dst}"', f"label={_q(_label(e, counts))}"]
        if e.deferred:
            attrs += ["style=dashed", 'color="#888888"', 'fontcolor="#666666"']
        elif counts is not None and counts.get(e.key, 0) == 0:
            attrs += ['color="#bbbbbb"', 'fontcolor="#999999"']
        elif counts is not None:
            attrs += ["penwidth=2"]
        out.append(f"  {_q(src)} -> {_q(e.dst)} [{', '.join(attrs)}];")
    for s in g.final:
        out.append(f'  {_q(s)} -> "{_END_NODE}" [id="edge-{s}-end"];')
    out.append("}")
    return "\n".join(out) + "\n"


# dot lays out six states in milliseconds; one that has not answered in this long never will (a wrapper waiting
# on a terminal): it is stopped and reported
DOT_TIMEOUT_S = 60

_VERSION_COMMENT = re.compile(r"<!-- Generated by graphviz version[^>]*-->\n?")


def dot_available() -> bool:
    return shutil.which("dot") is not None


def to_svg(g: Graph, counts: dict | None = None) -> str:
    """SVG via Graphviz ``dot -Tsvg``; the version comment is stripped so output is byte-stable."""
    exe = shutil.which("dot")
    if exe is None:
        raise FileNotFoundError("Graphviz `dot` is not installed (Debian: apt-get install graphviz)")
    # (a dot that cannot be executed, or that writes other than UTF-8, was a traceback: OSError, UnicodeDecodeError)
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=to_dot(g, counts).encode(), capture_output=True, check=False,
                              timeout=DOT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:  # (a dot that never exits hung the command for ever; run() kills it)
        raise RuntimeError(f"Graphviz {exe}: no answer from dot -Tsvg in {DOT_TIMEOUT_S} s; stopped it") from exc
    except OSError as exc:
        raise RuntimeError(f"Graphviz {exe}: cannot run it: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"dot -Tsvg failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    try:
        svg = proc.stdout.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RuntimeError(f"Graphviz {exe}: not UTF-8 SVG from dot -Tsvg ({exc.reason} at byte {exc.start})") from exc
    svg = _VERSION_COMMENT.sub("", svg)
    return svg.replace("\r\n", "\n")


def inline_svg(svg: str) -> str:
    """The ``<svg>`` element only (no XML declaration / DOCTYPE), for embedding in HTML."""
    i = svg.find("<svg")
    return svg[i:] if i >= 0 else html.escape(svg)


def render(fmt: str, spec: _spec.Spec | None = None, counts: dict | None = None) -> str:
    g = graph(spec)
    if fmt == "mermaid":
        return to_mermaid(g, counts)
    if fmt == "dot":
        return to_dot(g, counts)
    if fmt == "svg":
        return to_svg(g, counts)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either does not exist (yet): not the same file
        return False


def main_diagram(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lifecycle diagram",
                                description="Draw the lifecycle state diagram from the table (via transitions).")
    p.add_argument("--format", choices=FORMATS, default="mermaid")
    p.add_argument("--out", help="output file (default, or '-': stdout)")
    p.add_argument("--table", help="lifecycle table (default: the repository's)")
    p.add_argument("--counts-from", action="append", metavar="LOG", default=[],
                   help="overlay edge counts observed in LOG (repeatable; one per rank or merged)")
    a = p.parse_args(argv)
    if a.out == "":  # (an empty name was silently the same as no --out)
        p.error("--out needs a file name (leave it out for stdout)")
    if a.out == "-":  # (wrote a file named '-')
        a.out = None
    try:
        sp = _spec.load_default(a.table)
    except _spec.SpecError as exc:
        print(f"lifecycle diagram: {exc}", file=sys.stderr)
        return 2
    counts = None
    if a.counts_from:
        from .audit import audit_paths, log_path_problem

        for path in a.counts_from:
            if (why := log_path_problem(path)) is not None:
                print(f"lifecycle diagram: {why}: {path}", file=sys.stderr)
                return 2
        res = audit_paths(a.counts_from, sp)
        unread = res.finding_counts.get("malformed", 0) + res.finding_counts.get("unreadable", 0)
        if res.events == 0:  # (garbage drew a diagram of zero counts, silently)
            print(f"lifecycle diagram: no lifecycle events in {', '.join(a.counts_from)} ({res.lines} line(s), "
                  f"{unread} malformed or unreadable): nothing to count", file=sys.stderr)
            return 2
        if unread:
            first = next((f for f in res.findings if f.kind in ("malformed", "unreadable")), None)
            where = f", the first {first.file}:{first.line}: {first.message}" if first is not None else ""
            print(f"lifecycle diagram: warning: {unread} line(s) not counted (malformed or unreadable){where}",
                  file=sys.stderr)
        for f in res.by_kind("no_events"):  # (one rank's log empty among the others': its counts are missing)
            print(f"lifecycle diagram: warning: {f.message}", file=sys.stderr)
        for f in res.by_kind("table_mismatch"):  # (another table's counts were drawn over this one silently)
            print(f"lifecycle diagram: warning: {f}", file=sys.stderr)
        if res.illegal_edges:  # (moves the table does not have were dropped from the counts without a word)
            top = sorted(res.illegal_edges.items(), key=lambda kv: (-kv[1], str(kv[0])))[:3]
            shown = ", ".join(f"{n} {src or '[*]'} --{ev}--> {dst}" for (src, ev, dst), n in top)
            print(f"lifecycle diagram: warning: {sum(res.illegal_edges.values())} observed transition(s) are not in "
                  f"the table, so not drawn ({shown}{', ...' if len(res.illegal_edges) > 3 else ''})", file=sys.stderr)
        counts = dict(res.edges)
    try:
        text = render(a.format, sp, counts)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"lifecycle diagram: {exc}", file=sys.stderr)
        return 2
    if a.out:
        inputs = [("--table", a.table or str(_spec.default_table_path()))] + [("--counts-from", c) for c in a.counts_from]
        for what, path in inputs:  # (--out naming the table overwrote the one hand-written copy with a diagram)
            if _same_file(a.out, path):
                print(f"lifecycle diagram: --out {a.out} is the {what} input; refusing to overwrite it", file=sys.stderr)
                return 2
        try:
            Path(a.out).write_text(text, encoding="utf-8", newline="\n")
        except OSError as exc:
            print(f"lifecycle diagram: cannot write {a.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main_diagram())
