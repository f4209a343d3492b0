"""Links references to JAX, Optax, Flax, Chex, NumPy, Matplotlib and Python.

``sphinx.ext.intersphinx`` fetches each project's inventory over the network
at every build; the docs build offline (in the tests, on machines without
internet), so this extension links those names itself. Names under JAX,
NumPy, Matplotlib and Python follow each site's URL scheme; Optax, Flax
and Chex place names on pages by hand, so the names the docs refer to are
listed below with their pages. A name of these projects that is not listed
stays unresolved, and the nitpicky build fails on it: add it here.
"""

from docutils import nodes

_OPTAX = "https://optax.readthedocs.io/en/latest/api/"

# Public names, by the page of their project that documents them (Optax's
# pages as its docs/api/*.rst lay them out).
PAGES = {
    "optax.GradientTransformation": _OPTAX + "transformations.html",
    "optax.GradientTransformationExtraArgs": _OPTAX + "transformations.html",
}


def url(name):
    """The address documenting ``name``, or ``None`` if it is not known."""
    if name in PAGES:
        return f"{PAGES[name]}#{name}"
    top = name.split(".")[0]
    if top == "jax":
        return f"https://docs.jax.dev/en/latest/_autosummary/{name}.html"
    if top == "matplotlib":
        return f"https://matplotlib.org/stable/api/_as_gen/{name}.html"
    if top == "numpy":
        return f"https://numpy.org/doc/stable/reference/generated/{name}.html"
    if top in ("collections", "typing"):
        module = name.rsplit(".", 1)[0]
        return f"https://docs.python.org/3/library/{module}.html#{name}"
    return None


def _resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    address = url(node["reftarget"])
    if address is None:
        return None
    reference = nodes.reference("", "", internal=False, refuri=address)
    reference.append(contnode)
    return reference


def setup(app):
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
