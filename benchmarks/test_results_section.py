"""docs/performance.md's Results tables are what benchmarks/results_section.py writes from the
committed results.json: the page cannot drift from the measurements it cites."""

from __future__ import annotations

import json

import results_section


def test_performance_page_matches_committed_results():
    root = results_section.ROOT
    payload = json.loads((root / "benchmarks" / "results" / "results.json").read_text())
    page = (root / "docs" / "performance.md").read_text()
    between = page.split(results_section.BEGIN, 1)[1].split(results_section.END, 1)[0]
    assert between == "\n" + results_section.section(payload)


def test_section_names_every_w1_cpu_row():
    payload = json.loads(
        (results_section.ROOT / "benchmarks" / "results" / "results.json").read_text())
    text = results_section.section(payload)
    for name in ("max t2i mean, cpu", "max t2i mean, cpu-fp32", "scan i2t mean, cpu"):
        assert f"| {name} |" in text
