"""The documentation is self-contained: nothing cites a document the repository does not ship, and every
``docs/<page>.md#<section>`` cited in code, configs or Markdown names a heading that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".ipynb", ".toml", ".txt", ".cfg", ".sh", ""}
# Documents of the development setup that a user cloning the repository never sees.
OUTSIDE_DOCS = re.compile(r"bmp_reference|mm_architectures|style_anchors|DESIGN(?:\.md|\s*§|\s+section)")
# docs/<page>.md#<anchor> anywhere (also ../docs/... and ../../docs/... links)
DOC_CITE = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")
# links between the pages of docs/ and to the top-level README: (page.md#anchor), (../README.md#anchor)
DOC_LINK = re.compile(r"\]\((\.\./README\.md|[\w-]+\.md)#([\w-]+)\)")


def _repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored text files (what a commit of the working tree would contain)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked file list is unknown")
    files = [ROOT / p for p in out]
    return [p for p in files if p.is_file() and p.suffix in TEXT_SUFFIXES and p.name != Path(__file__).name]


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of the headings of a Markdown page (fenced code blocks skipped)."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            found.add(slug(m.group(1)))
    return found


def test_slug_matches_github() -> None:
    assert slug("Loop fixes: bmp_d3 vs bmp_v1_exact") == "loop-fixes-bmp_d3-vs-bmp_v1_exact"
    assert slug("Model zoo / paper numbers") == "model-zoo--paper-numbers"
    assert slug("The 21-keypoint schema") == "the-21-keypoint-schema"
    assert slug("RTMDet-Ins-L") == "rtmdet-ins-l"


def test_docs_pages_exist() -> None:
    assert {p.name for p in DOCS.glob("*.md")} >= {"README.md", "method.md", "recipes.md", "departures.md"}


def test_no_citation_of_documents_outside_the_repository() -> None:
    hits = []
    for path in _repo_files():
        for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_DOCS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()[:100]}")
    assert not hits, "cite the paper, the upstream file or docs/ instead:\n" + "\n".join(hits)


def test_cited_docs_sections_exist() -> None:
    cited: dict[tuple[str, str], list[str]] = {}
    for path in _repo_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for page, anchor in DOC_CITE.findall(text):
            cited.setdefault((page, anchor), []).append(str(path.relative_to(ROOT)))
        if path.parent == DOCS:  # relative links inside docs/
            for target, anchor in DOC_LINK.findall(text):
                page = "../README.md" if target == "../README.md" else target
                cited.setdefault((page, anchor), []).append(str(path.relative_to(ROOT)))
    assert len(cited) >= 10, "the code cites docs/ sections; finding none means the pattern broke"
    missing = []
    for (page, anchor), where in sorted(cited.items()):
        file = ROOT / "README.md" if page == "../README.md" else DOCS / page
        if not file.is_file() or anchor not in anchors(file):
            missing.append(f"{page}#{anchor} (cited in {', '.join(sorted(set(where)))})")
    assert not missing, "cited sections that do not exist:\n" + "\n".join(missing)


def test_docs_name_files_that_exist() -> None:
    """Every repository path the docs name (``bmp_lightning/...``, ``conf/...``, ``tests/...``) exists, so moving a
    module without updating docs/ fails here."""
    paths = re.compile(r"\b((?:bmp_lightning|conf|tests|experiments|notebooks)/[\w./-]*\w)")
    missing, checked = [], 0
    for page in sorted(DOCS.glob("*.md")):
        for rel in sorted(set(paths.findall(page.read_text(encoding="utf-8")))):
            checked += 1
            if not (ROOT / rel).exists():
                missing.append(f"{page.name}: {rel}")
    assert checked >= 20, "the docs name the code they describe; finding few paths means the pattern broke"
    assert not missing, "docs/ names paths that do not exist:\n" + "\n".join(missing)
