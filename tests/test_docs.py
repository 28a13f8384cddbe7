"""The documentation's links and paths resolve, and the results page's plots can be redrawn from the committed JSON."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "testbed").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
# a repository path under docs/ named in code, recipes or prose (stops at globs, braces and variables)
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*[\w/]")
SOURCES = ["README.md", "docs", "testbed", "recipes", "src", "benchmarks", "tests"]


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_markdown_links_resolve(path):
    missing = [t for t in _relative_links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing {missing}"


def test_docs_paths_named_anywhere_exist():
    """`docs/...` paths written in prose, code comments and recipes point at files that exist (the
    experiment log moved once; this catches the next move)."""
    files = [ROOT / "README.md"] + [
        f
        for d in SOURCES[1:]
        for f in sorted((ROOT / d).rglob("*"))
        if f.suffix in {".md", ".py", ".sh", ".yaml", ".yml", ".toml"} and f.is_file()
    ]
    missing = {
        f"{f.relative_to(ROOT)}: {m}"
        for f in files
        for m in DOCS_PATH.findall(f.read_text(encoding="utf-8"))
        if not (ROOT / m).exists()
    }
    assert not missing, sorted(missing)


def test_link_checker_finds_a_dangling_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md#x) [web](https://example.org) [anchor](#top)\n```\n[code](x)\n```")
    assert _relative_links(page) == ["page.md", "nowhere.md#x"]


def test_results_plots_redraw_from_committed_json(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("make_plots", ROOT / "docs" / "results" / "make_plots.py")
    make_plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_plots)  # in process: the eval package it imports is loaded once per session
    for draw, name in (
        (make_plots.plot_speedup, "speedup_vs_density.png"),
        (make_plots.plot_ppl, "ppl_vs_density.png"),
    ):
        assert draw(tmp_path) == tmp_path / name and (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the quality table it computes is the one on the results page
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    rows = [line for line in make_plots.quality_table().splitlines() if "---" not in line][1:]
    assert len(rows) == 9
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        page_row = next(r for r in results.splitlines() if r.replace("**", "").startswith(f"| {cells[0]} |"))
        assert [c.strip().replace("**", "") for c in page_row.strip("|").split("|")] == cells
