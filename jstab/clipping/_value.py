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
from jstab._numerics import ScalarOrSchedule
from jstab.clipping import _state
from jstab.clipping._state import ClipState


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
    """A bound for :func:`_inward`: a float if static, else an array."""
    static = _static(value)
    return static if static is not None else _numerics.resolve(value, count, dtype)


def _clip_elements(updates, state: ClipState, lower, upper, symmetric: bool):
    """Clips every element to [lower, upper] and records what it did.

    The statistics cost one read of the gradient: the largest ``|g|``, which
    is ``norm`` and says whether anything can lie outside the bounds; only
    then, under a ``lax.cond``, a second read counts what does. Leaves are
    grouped by dtype, each group with its own rounding of the bounds, and
    small leaves are reduced stacked (:func:`_numerics.group_reduce`).
    """
    leaves, treedef = jax.tree.flatten(updates)
    groups: dict[jnp.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        if x.size:
            groups.setdefault(x.dtype, []).append(i)
    bounds = {
        dtype: (_inward(lower, dtype, math.inf), _inward(upper, dtype, -math.inf))
        for dtype in {x.dtype for x in leaves}
    }
    out = [jnp.clip(x, *bounds[x.dtype]) for x in leaves]
    dtype = _numerics.accumulation_dtype(leaves)
    wide = [tuple(b.astype(dtype) for b in bounds[d]) for d in groups]
    index = list(groups.values())
    top = _numerics.group_reduce(leaves, index, dtype, "maxabs")
    norm = jnp.max(top, initial=0)
    # Every element lies in [-top, top]: inside [lo, hi] if that interval is.
    maybe = [(top[k] > hi) | (-top[k] < lo) for k, (lo, hi) in enumerate(wide)]

    def count(_):
        if symmetric:  # lower == -upper: the cheaper count of |g| > upper
            n = _numerics.group_reduce(
                leaves, index, dtype, "above", [hi for _, hi in wide]
            )
        else:
            n = _numerics.group_reduce(leaves, index, dtype, "outside", wide)
        return jnp.sum(n)

    n_clipped = jnp.zeros((), dtype)
    if maybe:
        n_clipped = jax.lax.cond(
            jnp.any(jnp.stack(maybe)), count, lambda _: n_clipped, None
        )
    size = max(sum(x.size for x in leaves), 1)
    fraction = n_clipped.astype(jnp.float32) / size
    return jax.tree.unflatten(treedef, out), _state.advance(state, norm, fraction)


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
      max_abs: the bound ``c > 0``: a float, a scalar array, or an
        ``optax.Schedule`` of the step count.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ClipState`.

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
        return _clip_elements(updates, state, -c, c, symmetric=True)

    return optax.GradientTransformation(_state.init_scalar, update_fn)


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
      upper: the upper bound β ≥ α, of the same kinds.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ClipState`.
    """
    _numerics.check_threshold("lower", lower, strict=False)
    _numerics.check_threshold("upper", upper, strict=False)
    dynamic = (callable(v) or isinstance(v, jax.core.Tracer) for v in (lower, upper))
    if not any(dynamic) and float(lower) > float(upper):  # type: ignore[arg-type]
        raise ValueError(
            f"`lower` must be <= `upper`, got lower={lower!r}, upper={upper!r}."
        )

    def update_fn(updates, state, params=None):
        del params
        dtype = _numerics.accumulation_dtype(jax.tree.leaves(updates))
        lo = _bound(lower, state.count, dtype)
        hi = _bound(upper, state.count, dtype)
        return _clip_elements(updates, state, lo, hi, symmetric=False)

    return optax.GradientTransformation(_state.init_scalar, update_fn)
