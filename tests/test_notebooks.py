"""The notebooks run top to bottom, in their small mode, and are committed clean.

Each notebook is executed by a Jupyter kernel (nbclient) in the notebooks'
folder, as Jupyter and Colab run them, with ``JSTAB_NOTEBOOK_SMALL=1``: the
same cells with fewer steps and smaller models. A cell that raises fails the
test, with the cell's source and the error.
"""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
EXPECTED = [
    "01_vanishing_exploding.ipynb",
    "02_initializers_in_flax.ipynb",
    "03_clipping_chains.ipynb",
    "04_clip_overhead_benchmark.ipynb",
    "05_many_devices.ipynb",
]
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
REPO = "https://github.com/jstab-dev/jstab"  # JSTAB_REPO, as the README gives it


def _install_cell(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_the_notebooks_are_there():
    names = [p.name for p in NOTEBOOKS]
    assert [n for n in EXPECTED if n not in names] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    dirty = [
        i
        for i, c in enumerate(code)
        if c["outputs"] or c["execution_count"] is not None
    ]
    assert dirty == [], f"{path.name}: code cells {dirty} have outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_opens_with_badge_and_install_cell(path):
    notebook = json.loads(path.read_text())
    first = "".join(notebook["cells"][0]["source"])
    colab = REPO.replace("github.com", "colab.research.google.com/github")
    assert BADGE in first and f"{colab}/blob/main/notebooks/{path.name}" in first
    install = _install_cell(path)
    assert f'JSTAB_REPO = "{REPO}"' in install and "print(jax.devices())" in install
    sources = [
        "".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"
    ]
    absolute = [m for s in sources for m in re.findall(r"[\"'](?:/|[A-Z]:\\)\w+", s)]
    assert absolute == [], f"{path.name}: absolute paths {absolute}"


@pytest.mark.parametrize("inside", [True, False], ids=["in checkout", "elsewhere"])
def test_install_cell_installs_what_is_missing(inside, monkeypatch, tmp_path):
    # One install cell, the same in every notebook.
    cells = {_install_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 1
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "jstab" else find_spec(name, *a),
    )
    monkeypatch.chdir(FOLDER if inside else tmp_path)
    exec(cells.pop(), {})
    source = ROOT.as_uri() if inside else f"git+{REPO}"
    assert calls == [
        [sys.executable, "-m", "pip", "install", "-q", f"jstab[demo] @ {source}"]
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, monkeypatch):
    # The kernel inherits this environment (conftest's XLA flags included).
    monkeypatch.setenv("JSTAB_NOTEBOOK_SMALL", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(FOLDER)}},
    )
    client.execute()  # raises CellExecutionError, with the cell, if one fails
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and all(o.output_type != "error" for o in outputs)
