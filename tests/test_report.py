"""HTML report: one self-contained file; loads in headless chromium with the SVG in the DOM, no JS errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from lifecycle import spec
from lifecycle.audit import audit_paths, main_audit
from lifecycle.report import render_html, state_colors
from tests.golden import make_golden as mg

SPEC = spec.load(spec.default_table_path())
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(tmp_path, broken: bool = True):
    ev = mg.clean_run()
    if broken:
        i = next(n for n, d in enumerate(ev) if d.get("trigger") == "expose")
        ev[i]["to_state"] = "Poisoned"
    p = tmp_path / "log.jsonl"
    p.write_text(mg.render(ev), encoding="utf-8")
    out = tmp_path / "report.html"
    rc = main_audit([str(p), str(mg.HERE / "poisoning.jsonl"), "--html", str(out)])
    return rc, out


def test_html_is_self_contained_and_has_the_parts(tmp_path, capsys):
    rc, out = _report(tmp_path)
    assert rc == 1
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external resources
    assert page.count("<svg") == 2  # diagram + timeline
    assert 'id="timeline"' in page and "illegal_transition" in page
    assert "expose ×" in page  # counts on the diagram edges
    assert "Time in state" in page and "Slowest requests" in page and "Outcomes" in page


def test_timeline_puts_violations_first_and_respects_the_cap(tmp_path):
    _, out = _report(tmp_path)
    res = audit_paths([str(tmp_path / "log.jsonl"), str(mg.HERE / "poisoning.jsonl")])
    page = render_html(res, SPEC, timeline_cap=2)
    labels = re.findall(r'<text x="0" y="\d+" class="rl">([^<]*)</text>', page)
    assert len(labels) == 2
    assert "illegal_transition" in labels[0]


def test_state_colors_follow_the_table():
    c = state_colors(SPEC)
    assert list(c) == list(SPEC.states) and len(set(c.values())) == len(c)


def _chromium(args, tmp_path, timeout=90):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _js_errors(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if "Uncaught" in l or re.search(r"CONSOLE.*(error|Error)", l)]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    _, out = _report(tmp_path)
    url = out.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<svg" in dom.stdout and 'id="timeline"' in dom.stdout
    assert 'data-report-ready="1"' in dom.stdout  # the script ran to its end
    assert not _js_errors(dom.stderr), _js_errors(dom.stderr)
    png = tmp_path / "shot.png"
    shot = _chromium([f"--screenshot={png}", "--window-size=1280,2000", url], tmp_path)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert not _js_errors(shot.stderr)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_the_js_error_check_detects_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><svg></svg><script>undefinedFn();</script></body></html>")
    dom = _chromium(["--dump-dom", bad.resolve().as_uri()], tmp_path)
    assert _js_errors(dom.stderr), dom.stderr[-2000:]
