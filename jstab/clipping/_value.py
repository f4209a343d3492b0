"""Elementwise clipping: ``clip_by_value`` and ``clip_by_range``."""

from __future__ import annotations

import math
import numbers

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jstab import _numerics
from jstab._numerics import ClipState, ScalarOrSchedule


class ClipByValueState(ClipState):
    """The state of :func:`clip_by_value`: the fields of :class:`ClipState`."""

    __slots__ = ()


class ClipByRangeState(ClipState):
    """The state of :func:`clip_by_range`: the fields of :class:`ClipState`."""

    __slots__ = ()


def _inward(bound, dtype: jnp.dtype, toward: float) -> chex.Array:
    """``bound`` rounded into ``dtype``, toward ``toward`` if it is not exact.

    Rounding to nearest could move a bound outward by half an ulp: a bfloat16
    gradient clipped to 0.1 would come out as 0.10009765625, a float32 one as
    0.10000000149. Rounded inward, every output lies within the bound, and
    ``x > bound`` means the same in both dtypes for every ``x`` of ``dtype``.
    A Python number is rounded from its exact (float64) value, in NumPy, at
    trace time; an array or a schedule's value from its own dtype.
    """
    if isinstance(bound, float):
        near = np.asarray(bound).astype(dtype)
        if float(near) > bound if toward < 0 else float(near) < bound:
            near = np.nextafter(near, np.asarray(toward, dtype))
        return jnp.asarray(near, dtype)
    near = bound.astype(dtype)
    wide = near.astype(bound.dtype)
    outside = wide > bound if toward < 0 else wide < bound
    return jnp.where(outside, jnp.nextafter(near, jnp.asarray(toward, dtype)), near)


def _static(value: object) -> float | None:
    """``value`` as a float if it is a plain number, else ``None``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, np.ndarray) and value.shape == ():
        return float(value)
    return None


def _bound(value, count, dtype):
    """A bound for :func:`_inward`: a float if static, else an array (NaN: 0)."""
    static = _static(value)
    if static is not None:
        return static
    bound = _numerics.resolve(value, count, dtype)
    return jnp.where(jnp.isnan(bound), jnp.zeros_like(bound), bound)


def _clip_elements(updates, state: ClipState, lower, upper, symmetric: bool):
    """Clips every element to [lower, upper] and records what it did.

    The statistics, the largest ``|g|`` (``norm``) and the number of elements
    clipped, take one read of the gradient
    (:func:`jstab._numerics.element_statistics`). Leaves are grouped by
    dtype, each group with its own rounding of the bounds.
    """
    leaves, treedef = jax.tree.flatten(updates)
    groups: dict[jnp.dtype, list[chex.Array]] = {}
    for x in leaves:
        if x.size:
            groups.setdefault(x.dtype, []).append(x)
    bounds = {
        dtype: (_inward(lower, dtype, math.inf), _inward(upper, dtype, -math.inf))
        for dtype in {x.dtype for x in leaves}
    }
    out = [jnp.clip(x, *bounds[x.dtype]) for x in leaves]
    dtype = _numerics.accumulation_dtype(leaves)
    norm, n_clipped = jnp.zeros((), dtype), jnp.zeros((), jnp.float32)
    for leaf_dtype, group in groups.items():
        lo, hi = (b.astype(dtype) for b in bounds[leaf_dtype])
        top, n = _numerics.element_statistics(
            group, None if symmetric else lo, hi, dtype
        )
        norm, n_clipped = jnp.maximum(norm, top), n_clipped + n
    size = max(sum(x.size for x in leaves), 1)
    fraction = n_clipped / size
    return jax.tree.unflatten(treedef, out), _numerics.advance(state, norm, fraction)


def clip_by_value(max_abs: ScalarOrSchedule) -> optax.GradientTransformation:
    r"""Clips every element of the gradient to ``[-max_abs, max_abs]``.

    .. math::
      g_i \leftarrow \min(\max(g_i, -c), c)

    The rule of ``torch.nn.utils.clip_grad_value_`` and ``optax.clip``, with
    a state: ``norm`` is the largest ``|g_i|`` before clipping and
    ``clipped`` the fraction of elements that exceeded ``c``. The bound is
    rounded toward zero into each leaf's dtype, so no output exceeds it.
    Unlike norm clipping it changes the gradient's direction.

    Args:
      max_abs: the bound ``c``: a float > 0, a scalar array, or an
        ``optax.Schedule`` of the step count. A run-time value that is 0,
        negative or NaN counts as 0: every element is clipped to 0.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ClipByValueState`.

    Example:
      >>> import jax.numpy as jnp, jstab
      >>> tx = jstab.clip_by_value(1.0)
      >>> g, state = tx.update(jnp.array([0.5, -3.0]), tx.init(None))
      >>> g.tolist(), float(state.norm), float(state.clipped)
      ([0.5, -1.0], 3.0, 0.5)

    References:
      Mikolov, `Statistical Language Models Based on Neural Networks
      <https://www.fit.vut.cz/study/phd-thesis-file/283/283.pdf>`_, 2012
    """
    _numerics.check_threshold("max_abs", max_abs)

    def update_fn(updates, state, params=None):
        del params
        dtype = _numerics.accumulation_dtype(jax.tree.leaves(updates))
        c = _bound(max_abs, state.count, dtype)
        if not isinstance(c, float):  # a run-time bound below 0 counts as 0
            c = _numerics.effective(c)
        return _clip_elements(updates, state, -c, c, symmetric=True)

    return optax.GradientTransformation(
        _numerics.scalar_init(ClipByValueState), update_fn
    )


def clip_by_range(
    lower: ScalarOrSchedule, upper: ScalarOrSchedule
) -> optax.GradientTransformation:
    r"""Clips every element of the gradient to ``[lower, upper]``.

    .. math::
      g_i \leftarrow \min(\max(g_i, \alpha), \beta)

    The asymmetric form of :func:`clip_by_value`. ``norm`` is the largest
    ``|g_i|`` before clipping and ``clipped`` the fraction of elements outside
    the range. The bounds are rounded inward into each leaf's dtype.

    Args:
      lower: the lower bound α: a float, a scalar array or a schedule.
      upper: the upper bound β ≥ α, of the same kinds. A run-time bound
        (an array, a schedule's value) that is NaN counts as 0, and a
        run-time range with α > β clips every element to 0.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ClipByRangeState`.
    """
    _numerics.check_threshold("lower", lower, strict=False)
    _numerics.check_threshold("upper", upper, strict=False)
    static = all(_numerics.is_static(v) for v in (lower, upper))
    if static and float(lower) > float(upper):  # type: ignore[arg-type]
        raise ValueError(
            f"`lower` must be <= `upper`, got lower={lower!r}, upper={upper!r}."
        )

    def update_fn(updates, state, params=None):
        del params
        dtype = _numerics.accumulation_dtype(jax.tree.leaves(updates))
        lo = _bound(lower, state.count, dtype)
        hi = _bound(upper, state.count, dtype)
        if not (isinstance(lo, float) and isinstance(hi, float)):
            # A run-time range that is empty clips every element to 0.
            empty = jnp.asarray(lo > hi)
            lo, hi = (jnp.where(empty, jnp.zeros((), dtype), b) for b in (lo, hi))
        return _clip_elements(updates, state, lo, hi, symmetric=False)

    return optax.GradientTransformation(
        _numerics.scalar_init(ClipByRangeState), update_fn
    )
