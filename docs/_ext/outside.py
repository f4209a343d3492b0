"""Links references to JAX, Optax, Flax, Chex, NumPy, Matplotlib and Python.

``sphinx.ext.intersphinx`` fetches each project's inventory over the network
at every build; the docs build offline (in the tests, on machines without
internet), so this extension links those names itself. Names under JAX,
NumPy, Matplotlib and Python follow each site's URL scheme; Optax, Flax
and Chex place names on pages by hand, so their pages are listed below.
A name of these projects that is not listed stays unresolved, and the
nitpicky build fails on it: add it here.
"""

from docutils import nodes

_OPTAX = "https://optax.readthedocs.io/en/latest/api/"
_FLAX = "https://flax.readthedocs.io/en/latest/api_reference/"

# Public names, by the page of their project that documents them.
PAGES = {
    "optax.GradientTransformation": _OPTAX + "transformations.html",
    "optax.GradientTransformationExtraArgs": _OPTAX + "transformations.html",
    "optax.OptState": _OPTAX + "transformations.html",
    "optax.Params": _OPTAX + "transformations.html",
    "optax.Updates": _OPTAX + "transformations.html",
    "optax.clip_by_global_norm": _OPTAX + "transformations.html",
    "optax.adaptive_grad_clip": _OPTAX + "transformations.html",
    "optax.masked": _OPTAX + "transformations.html",
    "optax.chain": _OPTAX + "combining_optimizers.html",
    "optax.MultiSteps": _OPTAX + "optimizer_wrappers.html",
    "optax.inject_hyperparams": _OPTAX + "optimizer_schedules.html",
    "optax.Schedule": _OPTAX + "optimizer_schedules.html",
    "optax.adam": _OPTAX + "optimizers.html",
    "optax.sgd": _OPTAX + "optimizers.html",
    "flax.linen.Module": _FLAX + "flax.linen/module.html",
    "flax.linen.RNNCellBase": _FLAX + "flax.linen/layers.html",
    "flax.nnx.Module": _FLAX + "flax.nnx/module.html",
    "chex.Array": "https://chex.readthedocs.io/en/latest/api.html",
    "chex.ArrayTree": "https://chex.readthedocs.io/en/latest/api.html",
}

# Where a name is defined, as Python reports it, to the name its project
# documents.
PUBLIC = {
    "jax.jaxlib._jax.Array": "jax.Array",
    "optax._src.base.GradientTransformation": "optax.GradientTransformation",
    "flax.linen.module.Module": "flax.linen.Module",
    "flax.linen.recurrent.RNNCellBase": "flax.linen.RNNCellBase",
    "flax.nnx.module.Module": "flax.nnx.Module",
}

_NUMPY_SCALARS = {"numpy.number", "numpy.bool", "numpy.generic"}


def url(name):
    """The address documenting ``name``, or ``None`` if it is not known."""
    name = PUBLIC.get(name, name)
    if name in PAGES:
        return f"{PAGES[name]}#{name}"
    top = name.split(".")[0]
    if top == "jax":
        return f"https://docs.jax.dev/en/latest/_autosummary/{name}.html"
    if top == "matplotlib":
        return f"https://matplotlib.org/stable/api/_as_gen/{name}.html"
    if name in _NUMPY_SCALARS:
        return f"https://numpy.org/doc/stable/reference/arrays.scalars.html#{name}"
    if top == "numpy":
        return f"https://numpy.org/doc/stable/reference/generated/{name}.html"
    if top in ("collections", "typing", "pathlib"):
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
