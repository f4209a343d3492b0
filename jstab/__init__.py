"""jstab: a JAX library against vanishing and exploding gradients.

Initializers with the ``jax.nn.initializers`` signature, Optax gradient
transformations for clipping whose state records what they did, and
diagnostics that tell which of the two problems a model has.
"""

from jstab.clipping import (
    ClipState,
    adaptive_grad_clip,
    clip_by_global_norm,
    clip_by_layer_norm,
    clip_by_range,
    clip_by_value,
)
from jstab.init import (
    Initializer,
    calculate_gain,
    compute_fans,
    delta_orthogonal,
    glorot_normal,
    glorot_uniform,
    he_normal,
    he_uniform,
    kaiming_normal,
    kaiming_uniform,
    lecun_normal,
    lecun_uniform,
    orthogonal,
    small_normal,
    small_uniform,
    truncated_normal,
    variance_scaling,
    xavier_normal,
    xavier_uniform,
)

__version__ = "0.1.0"

__all__ = [
    "ClipState",
    "Initializer",
    "__version__",
    "adaptive_grad_clip",
    "calculate_gain",
    "clip_by_global_norm",
    "clip_by_layer_norm",
    "clip_by_range",
    "clip_by_value",
    "compute_fans",
    "delta_orthogonal",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
    "small_normal",
    "small_uniform",
    "truncated_normal",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
]
