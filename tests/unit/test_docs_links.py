"""Every relative link of the manual resolves: README.md and docs/**/*.md.

A link ``[text](path)`` or ``[text](path#anchor)`` (or a reference definition ``[id]: path``)
whose target has no scheme must name a file or directory of the repository, and its
``#anchor``, when it has one and the target is Markdown, must be the slug of one of that file's
headings, as GitHub makes it (lower case; characters other than letters, digits, ``-``, ``_``
and spaces dropped; each space a ``-``; a repeated slug gets ``-1``, ``-2`` …). A bare
``#anchor`` is looked up in the file itself. Links inside fenced code blocks and code spans are
not links. External links (``https:``, ``mailto:`` …) are not fetched.

Pure: reads files, no network.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^\s*(```|~~~)")
# a code span may run over a line break, not over a blank line
CODE_SPAN = re.compile(r"(`+)(?:(?!\1)[^\n]|\n(?!\s*\n))+?\1")
# [text](target) or ![alt](target "title"); the text may hold [brackets] and line breaks
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^[ \t]{0,3}\[[^\]]+]:[ \t]*(<[^>]*>|\S+)", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def manual_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (github-slugger), before de-duplication."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "")
    return "".join(ch for ch in text.lower() if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link into ``path`` may name: its headings' slugs, de-duplicated as GitHub
    does, and explicit ``<a name|id="...">`` anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in ``path`` outside code, links whose text runs over
    a line break included."""
    kept = dict(prose_lines(path.read_text(encoding="utf-8")))
    last = max(kept, default=0)
    text = "\n".join(kept.get(number, "") for number in range(1, last + 1))
    text = CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    matches = sorted([*INLINE_LINK.finditer(text), *REFERENCE_DEF.finditer(text)],
                     key=lambda m: m.start())
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).strip("<>")) for m in matches]


def broken_links(path: Path) -> list[str]:
    """What is wrong with the relative links of ``path``, one line each."""
    problems = []
    where = path.relative_to(ROOT)
    for number, target in links(path):
        if not target or SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if ROOT not in resolved.parents and resolved != ROOT:
            problems.append(f"{where}:{number}: {target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}:{number}: {target}: no such file")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            problems.append(f"{where}:{number}: {target}: no heading with anchor #{anchor}")
    return problems


def test_github_slugs() -> None:
    assert slug("Coalesced messages (`?batch=MS`)") == "coalesced-messages-batchms"
    assert slug("`setup_db.py`") == "setup_dbpy"
    assert slug("Resume state is the bridge's") == "resume-state-is-the-bridges"
    assert slug("The event log is the truth; NOTIFY is the doorbell") == (
        "the-event-log-is-the-truth-notify-is-the-doorbell")
    assert slug("Security: what the daemon trusts") == "security-what-the-daemon-trusts"
    assert slug("PostgreSQL → WebSocket") == "postgresql--websocket"


def test_duplicate_headings_get_numbered_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n## Same\n```\n## not a heading\n```\n## Same\n", encoding="utf-8")
    assert anchors(page) == {"title", "same", "same-1"}


def test_links_in_code_are_not_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](one.md) `[b](two.md)`\n```\n[c](three.md)\n```\n[d]: <four.md#x>\n"
                    "[e, over\ntwo lines](five.md)\n", encoding="utf-8")
    assert links(page) == [(1, "one.md"), (5, "four.md#x"), (6, "five.md")]


def test_every_relative_link_of_the_manual_resolves() -> None:
    files = manual_files()
    assert len(files) > 10, "the manual is README.md and docs/**/*.md"
    problems = [problem for path in files for problem in broken_links(path)]
    assert not problems, "\n".join(problems)
