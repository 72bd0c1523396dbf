"""The README and docs/: every relative link resolves inside the repository, the README fits a screen, and the
docs speak of what was done, not of internal work items."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
WORK_ITEM = re.compile(r"issue [0-9]|stop [0-9]|(?<![\w#&/])#[0-9]", re.IGNORECASE)


def links(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)  # not links in code blocks
    return LINK.findall(text)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(path):
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same file
        assert "../" not in target, f"{path.name}: {target} climbs out of its folder"
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.is_relative_to(ROOT), f"{path.name}: {target} points outside the repository"
        assert file.exists(), f"{path.name}: {target} does not exist"


def test_readme_fits_a_screen():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_internal_work_items(path):
    found = [line for line in path.read_text(encoding="utf-8").splitlines() if WORK_ITEM.search(line)]
    assert not found, f"{path.name} refers to internal work items: {found[:3]}"
