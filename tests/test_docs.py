"""The documentation: every relative link in README.md, CHANGELOG.md and docs/ resolves (the file exists and, for
`#anchor`, a heading in it makes that anchor by GitHub's rules); the README stays a front door (at most 250
lines, no commit hashes) and keeps the test command that .ci/run runs."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCUMENTS = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("**/*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
COMMIT_IN_BACKTICKS = re.compile(r"`[0-9a-f]{7,40}`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto: ...


def prose_lines(text: str, code_spans: bool = False) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out unless `code_spans`."""
    lines, fenced = [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and (fenced is None or fence.group(1) == fenced):
            fenced = fence.group(1) if fenced is None else None
            lines.append("")
            continue
        if fenced or code_spans:
            lines.append("" if fenced else line)
        else:
            lines.append(CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, without punctuation other than '-' and '_',
    each space a '-'."""
    text = INLINE_LINK.sub(lambda m: m.group(1), heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = (c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return "".join(kept).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor the headings of a markdown text make (a repeated heading gets -1, -2, ...)."""
    found: dict[str, int] = {}
    for line in prose_lines(markdown, code_spans=True):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = found.get(base)
            found[base] = 0 if count is None else count + 1
            if count is not None:
                found[f"{base}-{count + 1}"] = 0
    return set(found)


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link and image outside code."""
    found = []
    for number, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), start=1):
        found += [(number, m.group(2)) for m in INLINE_LINK.finditer(line)]
        reference = REFERENCE_LINK.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """One line per relative link of `path` whose file or heading does not exist."""
    broken = []
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{number}"
        if not resolved.exists():
            broken.append(f"{where}: {target}: no such file")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved.read_text("utf-8")):
            broken.append(f"{where}: {target}: no heading makes #{anchor} in {resolved.name}")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(document):
    assert document.exists()
    assert broken_links(document) == []


def test_the_docs_exist_and_the_readme_links_to_each():
    docs = [p for p in DOCUMENTS if p.parent.name == "docs"]
    assert len(docs) >= 5
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if not EXTERNAL.match(t)}
    assert {p.resolve() for p in docs} <= linked, "a docs/ file the README does not link to"


def test_the_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert COMMIT_IN_BACKTICKS.findall(text) == [], "commit hashes belong in docs/ or CHANGELOG.md"


def test_the_readme_states_the_command_ci_runs():
    """.ci/run runs 'the README's test command, unchanged': its last line must be in the README as it is."""
    command = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1].strip()
    assert "pytest" in command
    assert command in README.read_text(encoding="utf-8")


# --- the checker itself -----------------------------------------------------------------------------------------


def test_slugs_follow_githubs_rules():
    assert slug("The attack grid (Lermen et al. 2023)") == "the-attack-grid-lermen-et-al-2023"
    assert slug("Scale-out: SLURM, DeepSpeed ZeRO-3, GPUs") == "scale-out-slurm-deepspeed-zero-3-gpus"
    assert slug("Reading `tamperlab compare`") == "reading-tamperlab-compare"
    assert slug("The organism's hazard domain") == "the-organisms-hazard-domain"
    assert slug("Judged by the seeds' spread") == "judged-by-the-seeds-spread"
    assert slug("A — B") == "a--b"
    assert "tamperlab-compare" in anchors("# Title\n\n## `tamperlab compare`\n")
    assert slug("[Linked](x.md) snake_case") == "linked-snake_case"


def test_the_checker_reports_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section: here\n\n## A section: here\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine](other.md#a-section-here) [fine](other.md#a-section-here-1) [fine](#page)\n"
        "[web](https://example.com/nowhere.md) ![image](other.md)\n"
        "[gone](missing.md)\n"
        "[no heading](other.md#nowhere)\n"
        "[not here](#elsewhere)\n"
        "`[in code](missing-in-span.md)`\n"
        "```\n[in a block](missing-in-block.md)\n```\n"
        "[ref]: missing-reference.md\n",
        encoding="utf-8",
    )
    broken = broken_links(page)
    assert len(broken) == 4, broken
    assert "missing.md: no such file" in broken[0] and ":5:" in broken[0]
    assert "other.md#nowhere" in broken[1] and "#elsewhere" in broken[2]
    assert "missing-reference.md: no such file" in broken[3]
