"""The tutorials stay true: every ```python block of each chapter runs, in order, in one namespace, from
the repository root (each chapter checks its own claims with asserts)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "tutorials").glob("[0-9]*.md"))


def test_there_are_chapters():
    assert len(CHAPTERS) >= 3


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.name)
def test_chapter_runs(chapter, monkeypatch, capsys):
    blocks = re.findall(r"^```python\n(.*?)^```", chapter.read_text(), flags=re.S | re.M)
    assert blocks, f"{chapter.name} has no python block"
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"tutorial_{chapter.stem}"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{chapter.name}, block {number}", "exec"), namespace)


def test_the_readme_keeps_its_sections_and_names_every_file():
    # What the README must always say (a rewrite of one paragraph once deleted three sections unnoticed).
    readme = (ROOT / "README.md").read_text()
    for heading in ("## Set-up", "## Usage", "## Measured on GPUs", "## The memory idea", "## How it is built",
                    "## Checkpoints", "## What works now, and what is left out"):
        assert f"\n{heading}" in readme, f"README.md lost its section {heading!r}"
    table = readme.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    for path in sorted(ROOT.glob("*.py")):
        assert f"`{path.name}`" in table, f"README.md's file table does not name {path.name}"
