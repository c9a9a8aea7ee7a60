"""The README and the docs pages point at things that exist: every relative link (file and anchor) and
every repository path they quote, in prose or in a command. A page moved or a file renamed breaks here,
not in a newcomer's hands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a path from the repository's root: a top-level folder of the project, then what follows it up to a space
# or a markdown character; `<name>` placeholders and `...` elisions are not paths
REPO_PATH = re.compile(r"(?<![\w./-])((?:tag_lightning|configs|tests|bench|docs|\.ci|data/examples)/[\w./*-]*)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens; repeats get -1, -2."""
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").split("\n"):
        in_code ^= line.startswith("```")
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_pages_exist_and_the_readme_is_a_front_page():
    assert {page.name for page in PAGES} >= {"README.md", "CONTRIBUTING.md", "pipeline.md", "real-runs.md",
                                             "format-and-rewards.md", "extending.md", "benchmarks.md",
                                             "experiment.md"}
    assert len((ROOT / "README.md").read_text(encoding="utf-8").split("\n")) <= 300


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_reaches_a_file_and_its_anchor(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_quoted_repository_path_exists(page):
    missing = []
    for quoted in REPO_PATH.findall(page.read_text(encoding="utf-8")):
        path = quoted.rstrip(".")
        if "*" in path:
            if not list(ROOT.glob(path)):
                missing.append(path)
        elif not (ROOT / path).exists():
            missing.append(path)
    assert not missing, missing


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().split("\n")[-1]
    assert ci in readme
    assert shlex.split(ci)[-6:] == ["python", "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile"][-6:]
