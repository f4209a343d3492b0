"""The residual gate's formula, shared by the Linen and NNX modules."""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jstab import _checks
from jstab._numerics import compute_dtype


def init_value(value: object) -> float:
    """``value`` as a finite float, or raises naming ``init_value``."""
    return _checks.real_number("init_value", value)


def gate(x: chex.Array, alpha: chex.Array, branch_output: chex.Array) -> chex.Array:
    """``x + alpha * branch_output`` in at least float32, returned in x's dtype."""
    x, branch_output = jnp.asarray(x), jnp.asarray(branch_output)
    if x.shape != branch_output.shape:
        raise ValueError(
            "ResidualGate: `x` and `branch_output` must have the same shape, got "
            f"{x.shape} and {branch_output.shape}."
        )
    wide = compute_dtype(x.dtype)
    out = x.astype(wide) + alpha.astype(wide) * branch_output.astype(wide)
    return out.astype(x.dtype)
