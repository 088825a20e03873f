"""Benchmark scripts share BENCHMARKS.md: each rewrite touches only its own section."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import TITLE, write_section


def test_sections_are_added_then_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "loss", ["## Loss", "first"])
    write_section(path, "presets", ["## Presets", "table"])
    write_section(path, "loss", ["## Loss", "second", "with $1 and \\1 kept as written"])
    text = path.read_text()
    assert text.startswith(TITLE)
    assert "first" not in text and "with $1 and \\1 kept as written" in text
    assert text.index("## Loss") < text.index("## Presets")
    assert text.count("<!-- begin loss -->") == 1 and text.count("<!-- end presets -->") == 1
