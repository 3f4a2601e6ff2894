"""Every relative link in the user's pages leads somewhere.

README.md, bench/README.md and docs/*.md link to each other's files and
headings. A link is checked as GitHub renders it: the file (or directory)
must exist, and a `#fragment` must be the anchor of one of the target's
headings, spelled by GitHub's rules (lowercase, punctuation dropped, spaces
to hyphens, `-1`, `-2`... for repeated headings) or given by an explicit
`<a id=...>` / `<a name=...>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title"): the text may hold one level of brackets, the
# target no spaces (our pages never put spaces in a link's target).
INLINE_LINK = re.compile(r"(?<!\\)\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
MARKDOWN_LINK_TEXT = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
HTML_TAG = re.compile(r"<[^>]+>")


@dataclass(frozen=True)
class Link:
    page: Path
    line: int
    target: str


def outside_fences(text: str) -> Iterator[tuple[int, str]]:
    """The page's lines outside fenced code blocks, with their numbers."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1) == fence:
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        yield number, line


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The page's lines outside fenced code blocks, code spans blanked."""
    return [(number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line))
            for number, line in outside_fences(text)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before de-duplication)."""
    text = MARKDOWN_LINK_TEXT.sub(r"\1", heading)
    text = HTML_TAG.sub("", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in outside_fences(text):
        found.update(EXPLICIT_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading is None:
            continue
        slug = github_slug(heading.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[Link]:
    links: list[Link] = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        targets = INLINE_LINK.findall(line)
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto:...: not ours to check here
            links.append(Link(page, number, target))
    return links


def broken(link: Link, root: Path = ROOT) -> str | None:
    """Why the link leads nowhere (paths relative to root), or None."""
    where = f"{link.page.relative_to(root)}:{link.line}: {link.target}"
    path_part, _, fragment = link.target.partition("#")
    target = (link.page.parent / path_part).resolve() if path_part else link.page
    if not target.exists():
        return f"{where}: no such file"
    if fragment:
        if target.is_dir() or target.suffix != ".md":
            return f"{where}: an anchor in something other than a markdown page"
        if fragment not in anchors(target):
            return f"{where}: no heading or anchor #{fragment} in {target.relative_to(root)}"
    return None


def test_the_pages_are_found() -> None:
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/prove.md", "docs/benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [problem for link in relative_links(page) if (problem := broken(link))]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("`emperor prove`: prove, with test files forked from a preloaded base", "emperor-prove-prove-with-test-files-forked-from-a-preloaded-base"),
        ("master = false: one process per vassal (side by side, shared machine)", "master--false-one-process-per-vassal-side-by-side-shared-machine"),
        ("Latest figures (2026-12-07 18:22-18:38 UTC, load average 0.8-26 at each start)", "latest-figures-2026-12-07-1822-1838-utc-load-average-08-26-at-each-start"),
        ("`--shard I/N`: one CI job per part", "--shard-in-one-ci-job-per-part"),
        ("Status page, [metrics](x.md) & health", "status-page-metrics--health"),
    ],
)
def test_anchors_are_spelled_as_github_spells_them(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    other = tmp_path / "other.md"
    other.write_text("# A heading\n\n## A heading\n", encoding="utf-8")
    page.write_text(
        "[fine](other.md#a-heading) [repeated](other.md#a-heading-1)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) [self](#nowhere-here)\n"
        "`[in code](missing-too.md)`\n"
        "```\n[in a block](missing-three.md)\n```\n",
        encoding="utf-8",
    )
    problems = [problem for link in relative_links(page) if (problem := broken(link, tmp_path))]
    assert [problem.split(": ", 1)[1] for problem in problems] == [
        "missing.md: no such file",
        "other.md#nowhere: no heading or anchor #nowhere in other.md",
        "#nowhere-here: no heading or anchor #nowhere-here in page.md",
    ]
