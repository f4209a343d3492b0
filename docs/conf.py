"""Sphinx configuration of jstab's documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html`` after
``pip install -e ".[docs]"``. The notebooks are rendered with their cells
unexecuted: the tests run them.
"""

import pathlib
import shutil
import sys

import jstab

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "jstab"
author = "jstab developers"
copyright = "2026, jstab developers"
release = version = jstab.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    "outside",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "demo/table.md", "README.md"]
templates_path = ["_templates"]

# Every cross-reference must resolve: ours to the API reference, JAX's,
# Optax's, Flax's and NumPy's to their sites (the ``outside`` extension).
nitpicky = True

autosummary_generate = True
# The docstrings' Args say what each argument takes, in words; the
# annotations' aliases (``chex.Array`` expands to a union of six types)
# would add noise to every signature.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
# Not a restatement of the default: without it the build warns (a second
# description of jstab.demo.models.MLP.activation; a field docstring of
# jstab.demo.experiments.Config read as a type).
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"

html_theme = "sphinx_book_theme"
html_title = f"jstab {version}"
html_static_path = ["_static"]
html_css_files = ["jstab.css"]
html_theme_options = {
    "repository_url": "https://github.com/jstab-dev/jstab",
    "use_repository_button": True,
    "show_toc_level": 2,
}


def _copy_notebooks():
    """Copies ``notebooks/*.ipynb`` under ``docs/notebooks/`` to render them.

    Sphinx reads pages only from its source folder; the notebooks live at
    the repository's root, where Colab's badges point.
    """
    target = HERE / "notebooks"
    target.mkdir(exist_ok=True)
    for notebook in sorted((HERE.parent / "notebooks").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def _skip_tuple_members(app, what, name, obj, skip, options):
    """Leaves out what a ``NamedTuple`` state inherits or generates.

    Its fields are documented by the class's ``Attributes`` section; the
    generated accessors ("Alias for field number 0") and ``tuple``'s
    ``count`` and ``index`` would repeat them or add noise.
    """
    if what != "class":
        return None
    doc = getattr(obj, "__doc__", None) or ""
    if obj in (tuple.count, tuple.index) or doc.startswith("Alias for field"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_tuple_members)


_copy_notebooks()
