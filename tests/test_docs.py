"""The README is the front door and the reference is the MkDocs site: the README stays short, keeps its two
contract commands, and links only to files that exist; every page under docs/ is in the site's nav. (The site's
own links, anchors and API references are checked by `mkdocs build --strict` in .ci/run.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

DEMO = "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . && nsf demo"
TESTS = ('python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e ".[test]" '
         "&& python -m pytest")


def test_the_readme_is_a_front_door_with_its_two_commands_first():
    assert len(README.splitlines()) < 200
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert [b.strip() for b in blocks[:2]][0] == DEMO
    assert blocks[1].strip().startswith(TESTS)  # the full run: no marker expression, nothing deselected
    assert "-m" not in blocks[1].strip()[len(TESTS):]
    # .ci/run runs the README's test command (CI=true picks the full hypothesis profile)
    readme_pytest = blocks[1].strip().split("&& ")[-1]
    ci = (REPO / ".ci" / "run").read_text()
    assert f"CI=true {readme_pytest}\n" in ci and 'pip install -c constraints.txt -e ".[test]"' in ci


def test_the_readme_links_to_files_that_exist():
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", README) if "://" not in t]
    assert targets
    assert [t for t in targets if t and not (REPO / t).exists()] == []


def _nav_files(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    pages = sorted(str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md"))
    assert sorted(nav) == pages
    assert {"serving/index.md", "python.md", "batch.md", "video.md", "studio.md"} <= set(nav)
