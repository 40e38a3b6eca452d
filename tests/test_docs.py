"""The README and the pages under docs/ point at things that exist: every relative link resolves
(anchors included), every ``python -m X`` names a module of this project or of its dependencies,
every script and config path a command names is in the tree, and the README keeps the commands a
newcomer needs on its first screens (CI installs and tests exactly as it says)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: link to {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_name_modules_and_files_that_exist(page):
    text = page.read_text(encoding="utf-8")
    for module in set(re.findall(r"python -m ([A-Za-z_][\w.]*)", text)):
        assert importlib.util.find_spec(module) is not None, f"{page.name}: python -m {module}: no such module"
    for path in set(re.findall(r"\b((?:benchmarks|configs|launch|tests)/[\w./-]+\.(?:py|yaml))\b", text)):
        if re.search(r"/[A-Z]+\.", path):  # a placeholder such as configs/X.yaml
            continue
        assert (ROOT / path).exists(), f"{page.name}: {path}: no such file"


def test_readme_keeps_the_first_commands_and_maps_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ('pip install torch==2.13.0', 'pip install -e ".[test]"', "python -m pytest -q",
                    "deepspeed launch/pretrain.py --config configs/tiny.yaml"):
        assert command in readme
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
