"""The README's python examples run as written, its test command is the one CI runs, and
every relative link of the README and of docs/ points to a file of this repository (so the
documentation cannot silently rot when a file moves)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TEST_COMMAND = "TRITON_INTERPRET=1 python -m pytest -q tests benchmarks"
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", flags=re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    assert TEST_COMMAND in README.read_text()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci


def relative_links(text: str) -> list[str]:
    """Link targets of a markdown text that name files (no URL, no in-page anchor), without
    their ``#anchor``; links inside fenced code blocks are not links."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)
    return [t.split("#", 1)[0] for t in targets if not SCHEME.match(t) and not t.startswith("#")]


def test_relative_links_are_found():
    text = "[a](docs/x.md#s) ![p](img.png) [u](https://e.org) [h](#top)\n```\n[c](no.md)\n```\n" \
        "[r]: ../y.md\n"
    assert relative_links(text) == ["docs/x.md", "img.png", "../y.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files_in_the_repository(page):
    bad = []
    for target in relative_links(page.read_text()):
        path = (page.parent / target).resolve()
        if not path.is_relative_to(ROOT):
            bad.append(f"{target} (outside the repository)")
        elif not path.exists():
            bad.append(f"{target} (missing)")
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"
