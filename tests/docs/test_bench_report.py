"""`make bench` writes docs/performance.md again: the hand-written notes below its marker stay."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_part_is_replaced_and_the_notes_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import report

    monkeypatch.setattr(report, "render_markdown", lambda data: "# Performance\n\nnew table\n")
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\n\nold table\n\n{report.NOTES_MARKER}\n\n# Notes\n\nmine\n")
    report.write_page({}, page)
    assert page.read_text() == (
        f"# Performance\n\nnew table\n\n{report.NOTES_MARKER}\n\n# Notes\n\nmine\n"
    )
    page.write_text("# Performance\n\nno notes\n")
    report.write_page({}, page)
    assert page.read_text() == "# Performance\n\nnew table\n"


def test_the_committed_page_has_its_notes_marker() -> None:
    text = (ROOT / "docs" / "performance.md").read_text()
    assert "<!-- notes below are written by hand; bench/report.py keeps them -->" in text
