"""Self-contained HTML audit report: annotated state diagram, request timeline, tables.

One file, no external resources: the diagram is Graphviz SVG inlined (edge labels carry the observed
counts), the timeline is an SVG drawn here (one bar per request, colored by state; requests with
violations first, then the slowest; capped), and a few lines of JavaScript filter the findings table.
"""

from __future__ import annotations

import html
from pathlib import Path

from . import diagram as _diagram
from . import spec as _spec
from .audit import VIOLATION_KINDS, WARNING_KINDS, AuditResult, RequestSummary

__all__ = ["render_html", "state_colors", "write_html"]

_PALETTE = {
    "initial": ["#4e79a7"],
    "active": ["#f28e2b", "#edc948", "#b07aa1"],
    "terminal": ["#59a14f", "#e15759", "#76b7b2"],
    "final": ["#bab0ac"],
}


def state_colors(spec: _spec.Spec) -> dict[str, str]:
    """A color per state, chosen by kind (initial blue, active warm, terminal green/red, final gray)."""
    used: dict[str, int] = {}
    out = {}
    for s in spec.states:
        k = spec.state_kinds[s]
        i = used.get(k, 0)
        used[k] = i + 1
        pal = _PALETTE[k]
        out[s] = pal[i % len(pal)]
    return out


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def _timeline(rows: list[RequestSummary], colors: dict[str, str]) -> str:
    if not rows:
        return "<p>No requests to show.</p>"
    label_w, bar_w, row_h, top = 300, 640, 18, 26
    longest = max(max(r.lifetime_ns for r in rows), 1)
    h = top + row_h * len(rows) + 8
    out = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 20}" height="{h}" '
           f'role="img" aria-label="request timeline">']
    out.append(f'<text x="{label_w}" y="14" class="axis">0 ms</text>')
    out.append(f'<text x="{label_w + bar_w}" y="14" class="axis" text-anchor="end">{_ms(longest)} ms</text>')
    for i, r in enumerate(rows):
        y = top + i * row_h
        bad = " ⚠ " + ",".join(r.kinds) if r.kinds else ""
        live = " (live)" if not r.ended else ""
        label = f"rank {r.rank} req {r.request}  {_ms(r.lifetime_ns)} ms{live}{bad}"
        cls = "bad" if r.kinds else "ok"
        out.append(f'<g class="req {cls}"><title>{_e(label)} — {_e(r.file)}:{r.line}</title>')
        out.append(f'<text x="0" y="{y + 12}" class="rl">{_e(label[:60])}</text>')
        for state, a, b in r.segments:
            x = label_w + (a - r.start_ns) * bar_w / longest
            w = max((b - a) * bar_w / longest, 1.0)
            out.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 5}" '
                       f'fill="{colors.get(state, "#999")}"><title>{_e(state)}: {_ms(b - a)} ms</title></rect>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _table(head: list[str], rows: list[list[object]], cls: str = "", tid: str = "") -> str:
    idattr = f' id="{tid}"' if tid else ""
    out = [f'<table class="{cls}"{idattr}><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.sum{display:flex;gap:12px;flex-wrap:wrap}.box{border:1px solid #ccc;border-radius:6px;padding:8px 14px}
.box b{display:block;font-size:20px}.verdict-ok{background:#e6f4ea}.verdict-bad{background:#fde8e8}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3} td.num{text-align:right} .diagram svg{max-width:100%;height:auto}
#timeline .rl{font-size:11px;font-family:monospace} #timeline .axis{font-size:10px;fill:#666}
#timeline .bad .rl{fill:#b00020} .legend span{display:inline-block;padding:1px 8px;margin-right:6px;border-radius:3px;color:#000}
"""

_JS = """
(function(){
  var sel=document.getElementById('kind-filter'); var tbl=document.getElementById('findings');
  if(!sel||!tbl){return;}
  sel.addEventListener('change',function(){
    var k=sel.value; var rows=tbl.tBodies[0].rows; var shown=0;
    for(var i=0;i<rows.length;i++){var ok=(k==='all'||rows[i].cells[0].textContent===k);
      rows[i].style.display=ok?'':'none'; if(ok){shown++;}}
    document.getElementById('shown').textContent=String(shown);
  });
  document.body.setAttribute('data-report-ready','1');
})();
"""


def render_html(res: AuditResult, spec: _spec.Spec, timeline_cap: int = 60) -> str:
    colors = state_colors(spec)
    g = _diagram.graph(spec)
    try:
        svg = _diagram.inline_svg(_diagram.to_svg(g, counts=dict(res.edges)))
        diagram_html = f'<div class="diagram">{svg}</div>'
    except (FileNotFoundError, RuntimeError) as exc:
        diagram_html = f"<p>(Graphviz unavailable: {_e(exc)})</p><pre>{_e(_diagram.to_dot(g, dict(res.edges)))}</pre>"
    verdict = "verdict-ok" if res.ok else "verdict-bad"
    p = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>kv-lifecycle audit</title>"
         f"<style>{_CSS}</style></head><body>"]
    p.append("<h1>kv-lifecycle audit</h1>")
    p.append(f"<p>{len(res.files)} file(s): {_e(', '.join(res.files))} &middot; table {_e(res.table_digest)}</p>")
    p.append('<div class="sum">')
    for label, val, cls in [("verdict", "OK" if res.ok else "VIOLATIONS", verdict), ("violations", res.violations, verdict),
                            ("events", res.events, ""), ("requests", res.requests, ""),
                            ("terminated", res.terminated, ""), ("live at end", res.live, ""),
                            ("ranks", ", ".join(map(str, res.ranks)) or "-", "")]:
        p.append(f'<div class="box {cls}"><b>{_e(val)}</b>{_e(label)}</div>')
    p.append("</div>")

    p.append("<h2>State diagram (observed transitions per edge)</h2>")
    p.append(diagram_html)
    if res.illegal_edges:
        p.append("<p>Illegal transitions seen (not in the table):</p>")
        p.append(_table(["from", "trigger", "to", "count"],
                        [[a or "*", e, b, n] for (a, e, b), n in sorted(res.illegal_edges.items(), key=lambda kv: str(kv[0]))]))

    p.append("<h2>Request timelines</h2>")
    rows: list[RequestSummary] = []
    seen = set()
    for r in [*res.violating, *sorted(res.slowest, key=lambda r: -r.lifetime_ns)]:
        k = (r.rank, r.request, r.start_ns)
        if k not in seen:
            seen.add(k)
            rows.append(r)
    shown = rows[:timeline_cap]
    p.append(f"<p>{len(shown)} request(s) shown (violations first, then the slowest; cap {timeline_cap}), "
             "time relative to each request's advertise.</p>")
    p.append('<p class="legend">' + "".join(
        f'<span style="background:{c}">{_e(s)}</span>' for s, c in colors.items() if spec.state_kinds[s] != "final") + "</p>")
    p.append(_timeline(shown, colors))

    p.append("<h2>Violations and warnings</h2>")
    p.append(_table(["kind", "count", "severity"],
                    [[k, res.finding_counts.get(k, 0), "excused" if k in res.excused else "violation"]
                     for k in VIOLATION_KINDS if res.finding_counts.get(k)]
                    + [[k, res.finding_counts.get(k, 0), "warning"] for k in WARNING_KINDS if res.finding_counts.get(k)]
                    or [["none", 0, ""]]))
    kinds = sorted({f.kind for f in res.findings})
    p.append('<p>Filter: <select id="kind-filter"><option value="all">all</option>'
             + "".join(f'<option value="{_e(k)}">{_e(k)}</option>' for k in kinds)
             + f'</select> showing <span id="shown">{min(len(res.findings), 500)}</span></p>')
    p.append(_table(["kind", "file", "line", "rank", "request", "message"],
                    [[f.kind, f.file, f.line, "" if f.rank is None else f.rank, "" if f.request is None else f.request,
                      f.message] for f in res.findings[:500]], tid="findings"))

    p.append("<h2>Time in state</h2>")
    p.append(_table(["state", "count", "p50 ms", "p99 ms", "max ms"],
                    [[s, h.count, _ms(h.quantile(0.5)), _ms(h.quantile(0.99)), _ms(h.max)]
                     for s, h in res.time_in_state.items()]
                    + [["(lifetime)", res.lifetime.count, _ms(res.lifetime.quantile(0.5)),
                        _ms(res.lifetime.quantile(0.99)), _ms(res.lifetime.max)]]))
    p.append("<h2>Outcomes</h2>")
    p.append(_table(["outcome", "count"], [[k, v] for k, v in res.outcomes.items()]))
    p.append("<h2>Slowest requests</h2>")
    p.append(_table(["rank", "request", "lifetime ms", "outcome", "path", "where"],
                    [[r.rank, r.request, _ms(r.lifetime_ns), r.outcome or "", " → ".join(s[0] for s in r.segments),
                      f"{r.file}:{r.line}"] for r in res.slowest]))
    if res.late or res.rejected:
        p.append("<h2>Late and rejected events</h2>")
        p.append(_table(["kind", "state", "trigger", "count"],
                        [["late", s, e, n] for (s, e), n in sorted(res.late.items())]
                        + [["rejected", s, e, n] for (s, e), n in sorted(res.rejected.items())]))
    p.append("<h2>Event counts and streams</h2>")
    p.append(_table(["event", "count"], [[k, v] for k, v in sorted(res.event_counts.items())]))
    p.append(_table(["stream", "pid", "file", "events", "first seq", "next seq"],
                    [[name, v["pid"], v["file"], v["events"], v["first_seq"], v["next_seq"]]
                     for name, v in sorted(res.streams.items())]))
    p.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(p)


def write_html(res: AuditResult, spec: _spec.Spec, out: str | Path, timeline_cap: int = 60) -> Path:
    path = Path(out)
    # (a log file's name that is not UTF-8 comes as surrogate escapes: shown as "?", never a crash)
    path.write_text(render_html(res, spec, timeline_cap), encoding="utf-8", errors="replace")
    return path
