"""jstab: a JAX library against vanishing and exploding gradients.

Initializers with the ``jax.nn.initializers`` signature, Optax gradient
transformations for clipping whose state records what they did, and
diagnostics that tell which of the two problems a model has.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
