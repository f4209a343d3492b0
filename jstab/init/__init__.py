"""Initializers with the ``jax.nn.initializers`` signature.

Every builder returns ``init(key, shape, dtype=dtype) -> Array``, usable as
``kernel_init`` in Flax Linen and NNX.
"""

from jstab.init._core import Initializer
from jstab.init._depth import deepnorm_constants, depth_scaled
from jstab.init._fans import compute_fans
from jstab.init._gain import calculate_gain
from jstab.init._orthogonal import delta_orthogonal, orthogonal
from jstab.init._small import small_normal, small_uniform, truncated_normal
from jstab.init._variance import (
    glorot_normal,
    glorot_uniform,
    he_normal,
    he_uniform,
    kaiming_normal,
    kaiming_uniform,
    lecun_normal,
    lecun_uniform,
    variance_scaling,
    xavier_normal,
    xavier_uniform,
)

__all__ = [
    "Initializer",
    "calculate_gain",
    "compute_fans",
    "deepnorm_constants",
    "delta_orthogonal",
    "depth_scaled",
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
