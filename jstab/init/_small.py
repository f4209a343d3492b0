"""Fixed-scale random initializers: small normal, small uniform, truncated."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jstab import _checks
from jstab.init import _core


@_core.builder
def small_normal(
    stddev: float = 0.01, dtype: jnp.dtype | None = None
) -> _core.Initializer:
    r"""Small random values: :math:`\mathcal{N}(0, \text{stddev}^2)`.

    The "small random numbers" initialization: its scale does not depend on
    the layer's width, so in a deep network the signal shrinks by a constant
    factor per layer and the gradients vanish. Kept as the baseline that the
    fan-based initializers are compared with; any shape, including scalars.

    Args:
      stddev: the standard deviation; ≥ 0.
      dtype: the default dtype of the result.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.
    """
    stddev = _checks.nonnegative("stddev", stddev)
    return _core.initializer(
        jax.nn.initializers.normal, (stddev,), dtype, f"small_normal({stddev})"
    )


@_core.builder
def small_uniform(
    limit: float = 0.01, dtype: jnp.dtype | None = None
) -> _core.Initializer:
    r"""Small random values: :math:`\mathcal{U}(-\text{limit}, \text{limit})`.

    The uniform variant of :func:`small_normal`; standard deviation
    :math:`\text{limit}/\sqrt{3}`. (``jax.nn.initializers.uniform(s)`` draws
    from :math:`[0, s)`, not a symmetric interval.)

    Args:
      limit: the bound; ≥ 0.
      dtype: the default dtype of the result.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.
    """
    limit = _checks.nonnegative("limit", limit)
    return _core.initializer(
        _symmetric_uniform, (limit,), dtype, f"small_uniform({limit})"
    )


def _symmetric_uniform(limit: float) -> _core.Sampler:
    """The sampler of U(-limit, limit)."""

    def sample(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return sample


def _phi(x: float) -> float:
    """The standard normal density."""
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _mass(lower: float, upper: float) -> float:
    """P(lower < Z < upper) for a standard normal Z, without cancellation in a tail."""
    if lower >= 0.0:
        return 0.5 * (
            math.erfc(lower / math.sqrt(2.0)) - math.erfc(upper / math.sqrt(2.0))
        )
    if upper <= 0.0:
        return _mass(-upper, -lower)
    return 0.5 * (math.erf(upper / math.sqrt(2.0)) - math.erf(lower / math.sqrt(2.0)))


def truncated_std(lower: float, upper: float) -> float:
    r"""Standard deviation of a standard normal truncated to ``(lower, upper)``.

    .. math::
      \operatorname{Var} = 1 + \frac{a\varphi(a) - b\varphi(b)}{Z}
        - \left(\frac{\varphi(a) - \varphi(b)}{Z}\right)^2,
      \qquad Z = \Phi(b) - \Phi(a).

    ``truncated_std(-2, 2)`` is 0.87962566103423978.
    """
    mass = _mass(lower, upper)
    if not mass > 0.0:
        raise ValueError(
            f"The interval (`lower`, `upper`) = ({lower!r}, {upper!r}) holds no "
            "probability mass in float64; choose bounds nearer to 0."
        )
    mean = (_phi(lower) - _phi(upper)) / mass
    variance = 1.0 + (lower * _phi(lower) - upper * _phi(upper)) / mass - mean**2
    if not variance > 0.0:
        raise ValueError(
            f"The interval (`lower`, `upper`) = ({lower!r}, {upper!r}) is too "
            "narrow for its variance to be computed in float64; widen it."
        )
    return math.sqrt(variance)


@_core.builder
def truncated_normal(
    stddev: float = 0.01,
    lower: float = -2.0,
    upper: float = 2.0,
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""A truncated normal whose standard deviation *after* truncation is ``stddev``.

    .. math::
      w = \frac{\text{stddev}}{s(a, b)}\, z, \qquad
      z \sim \mathcal{N}(0, 1) \text{ conditioned on } a < z < b,

    where :math:`s(a, b)` is the standard deviation of the truncated standard
    normal (0.8796 for the default ``(-2, 2)``). ``lower`` and ``upper`` are in
    units of the underlying, untruncated normal's standard deviation, as in
    ``jax.random.truncated_normal``: with the defaults
    :math:`|w| < 2\cdot\text{stddev}/0.8796`. ``jax.nn.initializers.
    truncated_normal`` does not correct the standard deviation; this one does.
    The mean is 0 when ``lower == -upper``.

    Args:
      stddev: the standard deviation of the result; ≥ 0.
      lower: the lower truncation point, in underlying standard deviations.
      upper: the upper truncation point; greater than ``lower``.
      dtype: the default dtype of the result.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.
    """
    stddev = _checks.nonnegative("stddev", stddev)
    lower = _checks.real_number("lower", lower)
    upper = _checks.real_number("upper", upper)
    if not lower < upper:
        raise ValueError(
            f"`lower` (={lower!r}) must be less than `upper` (={upper!r})."
        )
    underlying = stddev / truncated_std(lower, upper)
    return _core.initializer(
        jax.nn.initializers.truncated_normal,
        (underlying, None, lower, upper),
        dtype,
        f"truncated_normal({stddev}, {lower}, {upper})",
    )
