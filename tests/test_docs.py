"""The README and docs/ pages: every relative link and image resolves (file, and `#anchor` to a heading of the
target, GitHub-style), absolute links are well-formed (never fetched), and the README starts with the two
commands for a fresh machine, the second being exactly what `.ci/run` runs."""

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
SERVE = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/livetrain serve"

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?(.*?)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code (links there are not links)."""
    out, fence = [], None
    for line in text.split("\n"):
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if fence is None and marker:
            fence = marker.group(1)[0] * len(marker.group(1))
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        if line.startswith("    ") and (not out or out[-1] == ""):
            out.append("")  # an indented code block (starts after a blank line)
            continue
        out.append(line)
    prose = "\n".join(out)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", prose, flags=re.S)


def _links(page: Path) -> list[str]:
    prose = _prose(page.read_text())
    return LINK.findall(prose) + HTML_REF.findall(prose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*{1,3}|_{1,3})(\S(?:.*?\S)?)\1", r"\2", text)  # emphasis
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in _prose(page.read_text()).split("\n"):
        m = re.match(r" {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_slugs_are_githubs():
    assert _slug("Production: gunicorn") == "production-gunicorn"
    assert _slug('Fresh scores for the label stream, and "Complete"') == "fresh-scores-for-the-label-stream-and-complete"
    assert _slug("Segmentation: PolygonLabels and BrushLabels (Mask R-CNN)") == \
        "segmentation-polygonlabels-and-brushlabels-mask-r-cnn"
    assert _slug("The `MODEL_DIR` and **S3**") == "the-model_dir-and-s3"


def test_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "settings.md", "live-training.md", "deployment.md", "benchmarks.md"} <= names
    assert _links(ROOT / "README.md"), "no link found in README.md: the link parser is broken"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    page, problems = page.resolve(), []
    for target in _links(page):
        parts = urlsplit(target)
        if parts.scheme in ("http", "https"):
            host = parts.hostname or ""
            if re.search(r"\s", target) or not ("." in host or host == "localhost"):
                problems.append(f"malformed URL {target}")
            continue
        if parts.scheme == "mailto":
            continue
        if parts.scheme or parts.netloc or re.search(r"\s", target):
            problems.append(f"unexpected link {target}")
            continue
        path = unquote(parts.path)
        if path.startswith("/"):
            problems.append(f"absolute path {target}: use a path relative to {page.parent.relative_to(ROOT) or '.'}")
            continue
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: {file} does not exist")
            continue
        if ROOT not in file.parents and file != ROOT:
            problems.append(f"{target} leaves the repository")
            continue
        if parts.fragment:
            if file.suffix != ".md":
                problems.append(f"{target}: an anchor into a non-markdown file")
            elif unquote(parts.fragment).lower() not in _anchors(file):
                problems.append(f"{target}: no heading '#{parts.fragment}' in {file.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / urlsplit(t).path).resolve() for t in _links(ROOT / "README.md") if not urlsplit(t).scheme}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"{page.relative_to(ROOT)} is not linked from README.md"


def _ci_test_command() -> str:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line.startswith("python3 -m venv")]
    assert len(commands) == 1, commands
    return commands[0]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    blocks = list(re.finditer(r"^```(\w*)\n(.*?)\n```$", text, re.M | re.S))
    assert len(blocks) >= 2
    first, second = blocks[0], blocks[1]
    assert first.group(2) == SERVE and second.group(2) == _ci_test_command()
    assert first.group(1) == second.group(1) == "bash"
    # right after the title and its one-line description: no section, no other block before them
    head = text[:first.start()]
    assert head.startswith("# livetrain\n") and "\n## " not in text[:second.end()]
    assert len(head) < 400, "the commands must come first, right after the title and a line about livetrain"
    assert text[first.end():second.start()].strip() == ""


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 6500, "README.md is the two-minute front page: put details into docs/"
    sections = re.findall(r"^## (.*)$", text, re.M)
    assert "Connect Label Studio in three steps" in sections
    connect = text[text.index("## Connect Label Studio in three steps"):]
    connect = connect[:connect.index("\n## ")]
    assert re.findall(r"^(\d)\. ", connect, re.M) == ["1", "2", "3"]
    assert re.search(r"!\[[^\]]*\]\(docs/[^)]+\.png\)", text), "the front page shows a picture"
