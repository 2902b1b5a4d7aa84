"""The documentation stands alone: every relative link resolves inside the repository.

Checks README.md, docs/, deploy/, bench/ and examples/ Markdown files:

- every relative link (`[text](path)`, `[text](path#anchor)`, `[text](#anchor)`, reference
  definitions `[x]: path`, images) names a file or folder inside the repository that git does not
  ignore, and an anchor names a heading of the Markdown file it points into (GitHub's slug rules);
- nothing points at the workspace outside the repository (`../shared`) or names SPEC.md / KORA.md
  as files;
- README.md and docs/ do not speak of internal tracker items ("issue 6", "#14");
- README.md keeps its two commands on top.

The checker's own tests (test_checker_*) feed it broken Markdown, so that a checker that stopped
finding problems fails too.

Run: python3 -m pytest -q tests/docs
"""

import re
import shutil
import subprocess
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_GLOBS = ["README.md", "docs/**/*.md", "deploy/**/*.md", "bench/**/*.md", "examples/**/*.md"]
NO_TRACKER_GLOBS = ["README.md", "docs/**/*.md"]


def markdown_files(globs, root=ROOT):
    found = set()
    for pattern in globs:
        for path in root.glob(pattern):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
                found.add(path)
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Markdown reading


FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= set(fence[0]):
                fence = None
            continue
        yield number, line


CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def without_code_spans(line):
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"""<(?:a|img)\s[^>]*?(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def links(text):
    """(line number, target) of every link in prose."""
    for number, line in prose_lines(text):
        line = without_code_spans(line)
        for pattern in (INLINE_LINK, REFERENCE_DEFINITION, HTML_LINK):
            for match in pattern.finditer(line):
                yield number, match.group(1)


def is_external(target):
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


# GitHub's heading anchors: the heading's text, lower-cased, with everything but letters, digits,
# spaces, hyphens and underscores removed and spaces turned into hyphens; repeats get -1, -2, ...
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT_ANCHOR = re.compile(r"""<a\s[^>]*(?:name|id)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def heading_text(markdown):
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "")
    text = re.sub(r"(\*\*|__|\*)(.+?)\1", r"\2", text)  # emphasis markers around words
    return text.strip()


def slug(text):
    text = heading_text(text).lower()
    kept = "".join(
        character
        for character in text
        if character in " -_" or unicodedata.category(character)[0] in ("L", "N") or unicodedata.category(character) == "Mn"
    )
    return kept.replace(" ", "-")


def anchors(text):
    seen = {}
    found = set()
    for _, line in prose_lines(text):
        for match in EXPLICIT_ANCHOR.finditer(line):
            found.add(match.group(1))
        heading = ATX_HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


# ---------------------------------------------------------------------------------------------
# The checks, as functions returning problems (so the checker itself can be tested)


def git_ignored(path, root):
    if shutil.which("git") is None or not (root / ".git").exists():
        return False
    result = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "--", str(path)], capture_output=True)
    return result.returncode == 0


def link_problems(path, root=ROOT):
    problems = []
    text = path.read_text(encoding="utf-8")
    where = path.relative_to(root)
    for number, target in links(text):
        if not target or is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if file_part:
            resolved = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
            resolved = resolved.resolve()
            try:
                resolved.relative_to(root)
            except ValueError:
                problems.append(f"{where}:{number}: {target} leaves the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where}:{number}: {target} does not exist")
                continue
            if git_ignored(resolved, root):
                problems.append(f"{where}:{number}: {target} is ignored by git, so a clone does not have it")
                continue
        else:
            resolved = path
        if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
            if unquote(anchor) not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{where}:{number}: {target}: no heading with anchor #{anchor} in {resolved.relative_to(root)}")
    return problems


OUTSIDE = [
    (re.compile(r"\.\./shared\b"), "points at ../shared, outside the repository"),
    (re.compile(r"\b(?:SPEC|KORA)\.md\b"), "names SPEC.md / KORA.md, files a clone does not have"),
]
TRACKER = re.compile(r"\bissues?\s+#?\d+\b|(?:^|[\s(])#\d+\b", re.IGNORECASE)


def text_problems(path, root=ROOT, tracker=False):
    problems = []
    where = path.relative_to(root)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for pattern, why in OUTSIDE:
            if pattern.search(line):
                problems.append(f"{where}:{number}: {why}: {line.strip()}")
        if tracker and TRACKER.search(line):
            problems.append(f"{where}:{number}: refers to an internal tracker item: {line.strip()}")
    return problems


# ---------------------------------------------------------------------------------------------
# The repository's documentation


DOCUMENTS = markdown_files(DOC_GLOBS)


def test_the_documents_are_found():
    names = {str(path.relative_to(ROOT)) for path in DOCUMENTS}
    assert "README.md" in names
    assert {"docs/configuration.md", "docs/http-api.md", "docs/delivery.md", "docs/kora.md", "docs/operations.md"} <= names


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert link_problems(path) == []


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_nothing_points_outside_the_repository(path):
    tracker = path in markdown_files(NO_TRACKER_GLOBS)
    assert text_problems(path, tracker=tracker) == []


def test_the_readme_keeps_its_two_commands_on_top():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
    assert first_block, "README.md has no code block"
    assert text.index("```") < text.index("\n## "), "the commands must come before the first section"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands[:2] == ["swift run kora-sidecar demo", "scripts/test"]


# ---------------------------------------------------------------------------------------------
# The checker finds what it is meant to find


@pytest.fixture
def repository(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "target.md").write_text("# Target\n\n## Two words: `code` and **bold**\n\n## Repeat\n\n## Repeat\n")
    (tmp_path / "data.json").write_text("{}")
    return tmp_path


def write(repository, text):
    path = repository / "README.md"
    path.write_text(text)
    return path


def test_checker_accepts_good_links(repository):
    path = write(
        repository,
        "[a](docs/target.md) [b](docs/target.md#two-words-code-and-bold) [c](docs/target.md#repeat-1)\n"
        "[d](data.json) [e](docs/) [f](#local) [g](https://example.com/x.md#nowhere)\n\n## Local\n\n"
        "```\n[not a link](missing.md)\n```\n`[not a link either](missing.md)`\n",
    )
    assert link_problems(path, root=repository) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[x](docs/missing.md)", "does not exist"),
        ("[x](docs/target.md#nowhere)", "no heading with anchor #nowhere"),
        ("[x](#nowhere)", "no heading with anchor #nowhere"),
        ("[x](../outside.md)", "leaves the repository"),
        ("[x]: docs/missing.md", "does not exist"),
        ("![x](img/missing.png)", "does not exist"),
        ('<a href="docs/missing.md">x</a>', "does not exist"),
    ],
)
def test_checker_finds_broken_links(repository, text, expected):
    problems = link_problems(write(repository, text + "\n"), root=repository)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    "text",
    ["see [the contract](../shared/SPEC.md)", "as KORA.md says", "SPEC.md §4", "fixed in issue 6", "see #14 for why"],
)
def test_checker_finds_references_outside(repository, text):
    assert text_problems(write(repository, text + "\n"), root=repository, tracker=True) != []


def test_checker_allows_ordinary_text(repository):
    text = "docs/kora.md describes Kora; HTTP 429 and port 8080; [link](docs/target.md#target)\n"
    assert text_problems(write(repository, text), root=repository, tracker=True) == []


def test_slugs_follow_github():
    assert slug("`metrics`: an optional metrics listener") == "metrics-an-optional-metrics-listener"
    assert slug("Going live: check-kora") == "going-live-check-kora"
    assert slug("Errors, rate limits and retries") == "errors-rate-limits-and-retries"
    assert slug("What a service receives") == "what-a-service-receives"
    assert slug("`services[]`: who calls the proxy") == "services-who-calls-the-proxy"
