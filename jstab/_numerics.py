"""Numerics shared by the transforms: wide norms, thresholds, counters.

Norms are accumulated in :func:`compute_dtype` (float32 for bfloat16 and
float16 leaves: a sum of squares of float16 values overflows at 65504) and
are robust at both ends of the range. The fast path is one read of the
gradients, a plain sum of squares. Only when that sum has overflowed to
infinity, or is so small that squares may have underflowed to zero, does a
``lax.cond`` take the slow path: divide by the largest magnitude first, as
LAPACK's ``nrm2`` does, then sum. So float32 gradients of 1e30 have a finite
norm, and gradients of 1e-25 an accurate one, at no cost to ordinary steps.
One limit remains: a group whose every square underflows (all magnitudes
below about 1e-19 in float32) reports a norm of 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jstab import _checks

AxisName = str | tuple[str, ...] | None
ScalarOrSchedule = float | jax.Array | Callable[[chex.Numeric], chex.Numeric]

_INT32_MAX = np.iinfo(np.int32).max


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype arithmetic on a leaf of ``dtype`` is done in: at least float32.

    Initializers draw in it (a normal sampled directly in bfloat16 takes 128
    distinct values and its standard deviation is 0.3 % low; QR has no
    half-precision kernel on CPU) and round once at the end; norms are
    accumulated in it.
    """
    # Not jnp.promote_types: it fails under jax_numpy_dtype_promotion="strict".
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def accumulation_dtype(leaves: Sequence[chex.Array]) -> jnp.dtype:
    """The widest :func:`compute_dtype` over ``leaves`` (float32 if none)."""
    sizes = [compute_dtype(x.dtype) for x in leaves]
    return max(sizes, key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))


def safe_increment(count: chex.Array) -> chex.Array:
    """``count + 1`` for an int32 counter, saturating instead of wrapping."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


def scale(x: chex.Array, factor: chex.Array) -> chex.Array:
    """``x * factor`` in ``x``'s compute dtype, returned in ``x``'s dtype.

    A factor of exactly 1 returns ``x`` bit for bit: the product is exact and
    so is the round trip through a wider dtype.
    """
    wide = compute_dtype(x.dtype)
    return (x.astype(wide) * factor.astype(wide)).astype(x.dtype)


def factor(norm: chex.Array, threshold: chex.Array) -> chex.Array:
    """``min(1, threshold / norm)``: exactly 1 unless ``norm > threshold``."""
    over = norm > threshold
    return jnp.where(over, threshold / jnp.where(over, norm, 1), 1)


# ---------------------------------------------------------------- thresholds


def check_threshold(name: str, value: object, *, strict: bool = True) -> None:
    """Raises unless ``value`` is a schedule, a traced value or a number > 0.

    Schedules and traced values (``optax.inject_hyperparams`` passes arrays,
    traced under jit) cannot be checked when the transform is built. With
    ``strict=False`` the number may be 0 or negative: only finiteness counts.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return
    if strict:
        _checks.positive(name, value)
    else:
        _checks.real_number(name, value)


def resolve(value: ScalarOrSchedule, count: chex.Array, dtype: jnp.dtype):
    """A threshold's value at step ``count``, as a scalar of ``dtype``."""
    if callable(value):
        value = value(count)
    return jnp.asarray(value).astype(dtype)


def static_ord(ord: object) -> float | None:
    """``ord`` as 2.0 or inf, or ``None`` when it is traced (decided at run time).

    ``optax.inject_hyperparams`` turns ``ord`` into an array, traced under jit;
    then both norms are computed and one is selected.
    """
    if isinstance(ord, jax.core.Tracer):
        return None
    try:
        value = float(ord)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = None
    if isinstance(ord, bool) or value not in (2.0, float("inf")):
        raise ValueError(f"`ord` must be 2 or jnp.inf, got {ord!r}.")
    return value


def select_ord(ord: object, l2: chex.Array, linf: chex.Array) -> chex.Array:
    """The norm ``ord`` names; a traced ``ord`` other than inf means 2."""
    return jnp.where(jnp.asarray(ord) == jnp.inf, linf, l2)


# --------------------------------------------------------------------- norms


def _sumsq(x: chex.Array, dtype: jnp.dtype, axis=None) -> chex.Array:
    keep = axis is not None
    return jnp.sum(jnp.square(x.astype(dtype)), axis=axis, keepdims=keep)


def _maxabs(x: chex.Array, dtype: jnp.dtype, axis=None) -> chex.Array:
    keep = axis is not None
    return jnp.max(jnp.abs(x.astype(dtype)), axis=axis, keepdims=keep, initial=0)


def _needs_rescue(sumsq: chex.Array, dtype: jnp.dtype) -> chex.Array:
    """True where a fast sum of squares overflowed or may have underflowed."""
    # At or above sqrt(tiny), squares lost to underflow (each < tiny) change
    # the sum by a relative n * sqrt(tiny): 1e-10 for 1e9 float32 elements.
    small = np.sqrt(np.finfo(dtype).tiny).astype(dtype)
    return jnp.isinf(sumsq) | (sumsq < small)


def _scaled(m: chex.Array, t: chex.Array) -> chex.Array:
    """``m * sqrt(t)``: a norm from its largest magnitude and scaled squares."""
    return jnp.where(jnp.isfinite(m), m * jnp.sqrt(t), m)


def _group_l2(leaves, groups, dtype, axis_name: AxisName) -> chex.Array:
    def combine(values, reduce, collective):
        out = jnp.stack([reduce(jnp.stack([values[i] for i in g])) for g in groups])
        return out if axis_name is None else collective(out, axis_name)

    s = combine([_sumsq(x, dtype) for x in leaves], jnp.sum, lax.psum)
    need = _needs_rescue(s, dtype)

    def one_group(xs):
        m = jnp.max(jnp.stack([_maxabs(x, dtype) for x in xs]))
        if axis_name is not None:
            m = lax.pmax(m, axis_name)
        safe = jnp.where(m > 0, m, 1)
        t = sum(_sumsq(x.astype(dtype) / safe, dtype) for x in xs)
        if axis_name is not None:
            t = lax.psum(t, axis_name)
        return _scaled(m, t)

    def slow(leaves):
        # Each group pays for the rescue only if it needs it: a layer whose
        # gradient is exactly zero costs two reads of that layer alone.
        return jnp.stack(
            [
                lax.cond(
                    need[k],
                    one_group,
                    lambda _, k=k: jnp.sqrt(s[k]),
                    [leaves[i] for i in g],
                )
                for k, g in enumerate(groups)
            ]
        )

    return lax.cond(jnp.any(need), slow, lambda _: jnp.sqrt(s), list(leaves))


def _group_max(leaves, groups, dtype, axis_name: AxisName) -> chex.Array:
    m = [_maxabs(x, dtype) for x in leaves]
    out = jnp.stack([jnp.max(jnp.stack([m[i] for i in g])) for g in groups])
    return out if axis_name is None else lax.pmax(out, axis_name)


def group_norms(
    leaves: Sequence[chex.Array],
    groups: Sequence[Sequence[int]],
    ord: object = 2,
    axis_name: AxisName = None,
) -> chex.Array:
    """The ``ord``-norm of each group of whole leaves, as a vector.

    ``groups[k]`` lists the indices of the leaves forming group ``k``. The
    result has the accumulation dtype of the leaves. With ``axis_name``, sums
    are combined with ``lax.psum`` and maxima with ``lax.pmax`` over it.
    """
    dtype = accumulation_dtype(leaves)
    if not groups:
        return jnp.zeros((0,), dtype)
    which = static_ord(ord)
    if which == np.inf:
        return _group_max(leaves, groups, dtype, axis_name)
    l2 = _group_l2(leaves, groups, dtype, axis_name)
    if which == 2.0:
        return l2
    return select_ord(ord, l2, _group_max(leaves, groups, dtype, axis_name))


def global_norm(
    leaves: Sequence[chex.Array], ord: object = 2, axis_name: AxisName = None
) -> chex.Array:
    """The ``ord``-norm of all ``leaves`` together, a scalar (0 if none)."""
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return group_norms(leaves, [range(len(leaves))], ord, axis_name)[0]


def unit_norms(
    leaves: Sequence[chex.Array], axes: Sequence[tuple[int, ...]]
) -> list[chex.Array]:
    """L2 norms of ``leaves[i]`` over ``axes[i]``, keeping dimensions.

    Each result has the rank of its leaf and the accumulation dtype of all
    leaves; the same rescue as :func:`group_norms` applies to every unit.
    """
    if not leaves:
        return []
    dtype = accumulation_dtype(leaves)
    s = [_sumsq(x, dtype, a) for x, a in zip(leaves, axes, strict=True)]
    need = [_needs_rescue(si, dtype) for si in s]

    def one_leaf(x, a, si, ni):
        def slow(x):
            m = _maxabs(x, dtype, a)
            t = _sumsq(x.astype(dtype) / jnp.where(m > 0, m, 1), dtype, a)
            return jnp.where(ni, _scaled(m, t), jnp.sqrt(si))

        return lax.cond(jnp.any(ni), slow, lambda _: jnp.sqrt(si), x)

    def slow(leaves):
        return [one_leaf(*args) for args in zip(leaves, axes, s, need, strict=True)]

    any_need = jnp.any(jnp.stack([jnp.any(n) for n in need]))
    return lax.cond(any_need, slow, lambda _: [jnp.sqrt(si) for si in s], list(leaves))
