"""The documentation a user of the repository reads links only to files the repository has."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUTSIDE = "../" + "shared/"  # the sessions' own folder, which a clone does not have


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [target for target in targets if "://" not in target]
    missing = [target for target in local if not (page.parent / target).exists()]
    assert local and not missing, f"{page.name} links to missing files: {missing}"


def test_design_notes_are_linked_from_the_readme():
    assert "](docs/design.md)" in (ROOT / "README.md").read_text()


def our_files(suffixes=(".md", ".py", ".yaml", ".toml")):
    """The repository's text files, without git's, a virtual environment's, a cache's or a run's folders."""
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and not name.endswith(".egg-info")
                         and name not in ("runs", "__pycache__")]
        yield from (Path(folder) / name for name in names if name.endswith(suffixes))


def test_nothing_links_outside_the_repository():
    offending = [str(path.relative_to(ROOT)) for path in our_files() if OUTSIDE in path.read_text(errors="replace")]
    assert not offending, f"these files point to {OUTSIDE}, which a clone of the repository lacks: {offending}"
