"""Running mean and variance of the gradient norm, as ZClip keeps them.

For the first ``warmup_steps`` norms the statistics are the exact mean and
population variance of the norms seen (Welford's update, stable in float32);
after that an exponential moving average with weight ``alpha`` on the past:

.. math::
  \\mu \\leftarrow \\alpha \\mu + (1 - \\alpha) v, \\qquad
  \\sigma^2 \\leftarrow \\alpha \\sigma^2 + (1 - \\alpha) (v - \\mu)^2

with the new μ in the variance, as the ZClip authors' code does. Everything
is float32 scalars; no branch depends on a traced value. Norms above about
1e19 overflow the variance to inf: z-scores are then 0 (no spike is
detected), and nothing becomes NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jstab import _checks, _numerics


class Moments(NamedTuple):
    """Mean, population variance and how many norms entered them."""

    mean: chex.Array
    var: chex.Array
    samples: chex.Array


def init() -> Moments:
    # Distinct arrays: a state whose leaves share a buffer cannot be donated.
    return Moments(
        mean=jnp.zeros((), jnp.float32),
        var=jnp.zeros((), jnp.float32),
        samples=jnp.zeros((), jnp.int32),
    )


def of(state) -> Moments:
    """The :class:`Moments` held in ``state``'s fields of the same names."""
    return Moments(mean=state.mean, var=state.var, samples=state.samples)


def ready(moments: Moments, warmup_steps: chex.Numeric) -> chex.Array:
    """True once ``warmup_steps`` norms have entered the statistics."""
    return moments.samples >= jnp.asarray(warmup_steps).astype(jnp.int32)


def observe(
    moments: Moments,
    value: chex.Array,
    take: chex.Array,
    alpha: chex.Numeric,
    warmup_steps: chex.Numeric,
) -> Moments:
    """The statistics after ``value`` enters them, if ``take`` (else unchanged).

    Before :func:`ready`, Welford's update of the exact mean and population
    variance; after, the exponential moving average with weight ``alpha``.
    """
    v = lax.stop_gradient(value.astype(jnp.float32))
    alpha = jnp.asarray(alpha).astype(jnp.float32)
    mean, var, samples = moments
    # Welford, with the variance kept divided by the sample count; both terms
    # are >= 0, so an overflowed variance stays inf, never inf - inf = NaN.
    n = (samples + 1).astype(jnp.float32)
    delta = v - mean
    w_mean = mean + delta / n
    w_var = var * ((n - 1) / n) + delta * (v - w_mean) / n
    # Exponential moving average, with the new mean in the variance.
    e_mean = alpha * mean + (1 - alpha) * v
    e_var = alpha * var + (1 - alpha) * jnp.square(v - e_mean)
    warm = ready(moments, warmup_steps)
    new = Moments(
        mean=jnp.where(warm, e_mean, w_mean),
        var=jnp.where(warm, e_var, w_var),
        samples=_numerics.safe_increment(samples),
    )
    return jax.tree.map(lambda a, b: jnp.where(take, a, b), new, moments)


def zscore(norm: chex.Array, moments: Moments, eps: chex.Numeric):
    """``(z, σ)`` with ``z = (‖g‖ − μ) / (σ + eps)``, in float32.

    ``eps > 0`` is checked when the transform is built; a traced ``eps`` of 0
    with σ = 0 gives ``z = ±inf`` (or 0 when ‖g‖ = μ), never NaN.
    """
    std = jnp.sqrt(moments.var)
    den = std + jnp.asarray(eps).astype(jnp.float32)
    diff = norm.astype(jnp.float32) - moments.mean
    safe = jnp.where(den > 0, den, 1)
    inf = jnp.where(diff > 0, jnp.inf, jnp.where(diff < 0, -jnp.inf, 0))
    z = jnp.where(den > 0, diff / safe, inf)
    return z, std


def check(alpha: object, warmup_steps: object) -> None:
    """Raises unless ``alpha`` is in (0, 1) and ``warmup_steps`` an int ≥ 1."""
    if not _numerics.is_traced(alpha):
        a = _checks.real_number("alpha", alpha)
        if not 0 < a < 1:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
    if not _numerics.is_traced(warmup_steps):
        _checks.integer_at_least("warmup_steps", warmup_steps, 1)


def push(history: chex.Array, samples: chex.Array, value, take) -> chex.Array:
    """``history`` with ``value`` written over its oldest entry, if ``take``.

    ``history`` is a ring buffer holding the last ``len(history)`` values;
    ``samples`` values have entered it so far, so the next goes to
    ``samples mod len(history)``.
    """
    v = lax.stop_gradient(value.astype(jnp.float32))
    position = samples % jnp.asarray(history.shape[0], samples.dtype)
    return jnp.where(take, history.at[position].set(v), history)


def over_window(history: chex.Array, samples: chex.Array) -> tuple:
    """``(mean, var)``: the population statistics of the values ``history`` holds.

    Those are its first ``min(samples, len(history))`` entries; both are 0
    while it holds none.
    """
    size = jnp.asarray(history.shape[0], samples.dtype)
    held = jnp.minimum(samples, size)
    mask = jnp.arange(history.shape[0], dtype=samples.dtype) < held
    n = jnp.maximum(held, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, history, 0)) / n
    var = jnp.sum(jnp.where(mask, jnp.square(history - mean), 0)) / n
    return mean, var
