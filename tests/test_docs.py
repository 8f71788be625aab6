"""docs/*.md against the code: lists a reader relies on (finding kinds, ...) name what the code has."""

from __future__ import annotations

import re
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
