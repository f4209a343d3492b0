"""The documentation builds without a warning, covers the API, and runs.

The site is built from a copy of ``docs/`` and ``notebooks/``, so nothing
a previous build left in the checkout (generated API pages, the copied
notebooks) can hide a warning. Every ```` ```python ```` block of a page is
executed as written; fragments meant only to be read are written as
```` ```{code-block} python ````.
"""

import pathlib
import posixpath
import re
import shutil
import subprocess
import sys

import pytest
from sphinx.util.inventory import InventoryFile

import jstab

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# docs/README.md is for the writers of the pages, not one of them.
PAGES = sorted(p for p in DOCS.glob("*.md") if p.name != "README.md")
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
EXAMPLES = [
    (page.name, index)
    for page in PAGES
    for index in range(len(FENCE.findall(page.read_text())))
]
# Public text names ideas and papers, never the project's own documents.
INTERNAL = re.compile(r"\bseeds? \d{3}\b")


def test_docs_build_with_warnings_as_errors_and_cover_the_api(tmp_path):
    ignore = shutil.ignore_patterns("_build", "_autosummary", "notebooks")
    shutil.copytree(DOCS, tmp_path / "docs", ignore=ignore)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    html = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q"]
    command += ["-b", "html", "-d", str(tmp_path / "doctrees")]
    command += [str(tmp_path / "docs"), str(html)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-5000:]

    with open(html / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", posixpath.join)
    documented = {
        name
        for kind, entries in inventory.items()
        if kind.startswith("py:")
        for name in entries
    }
    missing = [n for n in jstab.__all__ if f"jstab.{n}" not in documented]
    assert not missing, f"not in the API reference: {missing}"
    for page in PAGES:  # every page is rendered (a stray one would warn)
        assert (html / page.with_suffix(".html").name).exists(), page.name
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for notebook in notebooks:
        assert (html / "notebooks" / f"{notebook.stem}.html").exists()


@pytest.mark.parametrize(("page", "index"), EXAMPLES)
def test_docs_example_runs(page, index):
    code = FENCE.findall((DOCS / page).read_text())[index]
    exec(compile(code, f"docs/{page}[python block {index}]", "exec"), {})


def test_docs_have_examples():
    assert len(EXAMPLES) >= 10


def test_public_text_names_no_internal_documents():
    files = [ROOT / "README.md", *DOCS.glob("*.md"), *DOCS.glob("*.rst")]
    files += ROOT.glob("jstab/**/*.py")
    files += ROOT.glob("notebooks/*.ipynb")
    files += ROOT.glob("benchmarks/*.py")
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in files
        for match in INTERNAL.finditer(path.read_text())
    ]
    assert not found, found
