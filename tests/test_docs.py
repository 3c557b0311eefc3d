"""The documents stay true to the tree: every relative link resolves, the README stays short and keeps its
sections and its file table, no file outside tests/ labels itself with the development history, and results/
holds data only (no Python), a few MB of it, each folder with the command that made it."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "PERFORMANCE.md", *sorted((ROOT / "tutorials").glob("*.md")),
             *sorted((ROOT / "results").glob("*/README.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or a heading of the same page
        path = (document.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{document.relative_to(ROOT)} links to {target}, which does not exist"


def test_readme_anchors_name_its_headings():
    readme = (ROOT / "README.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", readme):
        assert anchor in headings, f"README.md links to #{anchor}, which is no heading"


def test_the_readme_is_short_keeps_its_sections_and_names_every_file():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for heading in ("## Set-up", "## Fine-tune a checkpoint", "## Your data", "## Several GPUs and nodes",
                    "## Results", "## A tour of the code", "## What is left out"):
        assert f"\n{heading}" in readme, f"README.md lost its section {heading!r}"
    tour = readme.split("## A tour of the code", 1)[1].split("\n## ", 1)[0]
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*.sh")):
        assert f"`{path.name}`" in tour, f"README.md's tour of the code does not name {path.name}"
    assert "```bash\npip install -r requirements.txt && python train.py\n```" in readme  # what CI runs
    assert "```bash\npython -m pytest -q\n```" in readme


# A numbered stage, change, run or session used as a label: how the project was made, not what it is.
HISTORY = re.compile(r"\b(session|change|stage|run)s? ?\d+\b|\bPERF_NOTES\b|\b(was|were) lent\b", re.IGNORECASE)


def product_files():
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if path.is_file() and parts[0] not in ("tests", ".git", "data", ".ab") and \
                path.suffix in (".py", ".md", ".sh", ".toml", ".ini", ".txt") and "cache" not in str(path):
            yield path


def test_no_product_file_speaks_of_the_development_history():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}" for path in product_files()
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if HISTORY.search(line)]
    assert not found, "\n".join(found[:20])


def test_results_hold_data_with_the_command_that_made_it():
    folders = [p for p in (ROOT / "results").iterdir() if p.is_dir()]
    assert folders
    assert not list((ROOT / "results").rglob("*.py")), "results/ holds data only: scripts live in git history"
    size = sum(p.stat().st_size for p in (ROOT / "results").rglob("*") if p.is_file())
    assert size < 4 * 2**20, f"results/ holds {size / 2**20:.1f} MB"
    for folder in folders:
        readme = folder / "README.md"
        assert readme.is_file(), f"{folder.relative_to(ROOT)} has no README.md saying what made it"
        assert "```" in readme.read_text(), f"{readme.relative_to(ROOT)} shows no command"
